"""Generator replicas on GPUs (`replica_gpus`), checked on a CPU-only machine: the model runs on
the replica's device with every input moved there (the "meta" device guard of
tests/unit/metrics/test_devices.py), the Ray resources ask for the GPU, and a GPU that no node
has is refused before anything is deployed."""

import pytest
import torch
from pydantic import ValidationError

from helpers import guard_checkpoint_loads, runs_on_the_model_device, tiny
from latentforge.errors import ConfigError
from latentforge.serve.config import ServeConfig
from latentforge.serve.schemas import GenerateRequest, InterpolateRequest, LatentSource


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    from latentforge.train.local import train_local

    root = tmp_path_factory.mktemp("gpu-replicas")
    for preset in ("cdcgan-mnist", "vae-mnist", "stylegan2-mnist"):  # z-space GAN, VAE decoder, W-space GAN
        train_local(tiny(preset, train__steps=2, train__checkpoint_every=2), mnist_dir, root / preset, log=lambda *_: None)
    return root


def test_a_runtime_on_a_device_moves_every_input_there_and_hands_images_back_on_the_cpu(runs, monkeypatch):
    from latentforge.serve import engine

    asked = _guarded_loads(monkeypatch)
    for preset in ("cdcgan-mnist", "vae-mnist", "stylegan2-mnist"):
        rt = engine.ModelRuntime("m", runs / preset, device="meta")
        rt.prior = None  # a fitted prior samples real numbers before the decoder runs (meta has none)
        runs_on_the_model_device(lambda: rt.generate_many([GenerateRequest(n=2, seed=1), GenerateRequest(n=1, seed=2)]))
        runs_on_the_model_device(lambda: rt.interpolate(InterpolateRequest(a=LatentSource(seed=1), b=LatentSource(seed=2),
                                                                          steps=3)))
    assert asked == ["meta"] * 3


def test_an_editor_on_a_device_projects_images_there(runs, monkeypatch):
    """`editor_gpus`: reconstructing, inpainting, denoising, and edits and interpolations whose
    source is an image, move the decoded image, its mask and label to the model's device for the
    projection, and stop only where the results are copied back to the CPU (the runtime keeps
    latents, images and directions there)."""
    from latentforge.editing import space
    from latentforge.editing.directions import Direction
    from latentforge.serve import engine
    from latentforge.serve.codec import encode_png_b64
    from latentforge.serve.schemas import EditRequest, ImageRequest, InpaintRequest

    asked = _guarded_loads(monkeypatch)
    # W models map their random starts to w and hand them to the CPU first: kept on the device here,
    # so that the projection in W runs on meta too
    mapped = space.latents_from_noise
    monkeypatch.setattr(space, "latents_from_noise", lambda model, z, labels=None, truncation=None: (
        model.latents_from_noise(z.to("meta"), labels, truncation) if hasattr(model, "latents_from_noise")
        else mapped(model, z, labels, truncation)))
    image = encode_png_b64(torch.zeros(1, 28, 28))
    mask = torch.zeros(1, 28, 28)
    mask[:, 10:18, 10:18] = 1  # white: fill
    mask = encode_png_b64(mask * 2 - 1)
    for preset in ("cdcgan-mnist", "vae-mnist", "stylegan2-mnist"):
        rt = engine.ModelRuntime("m", runs / preset, device="meta")
        rt._directions = {"d": Direction("d", torch.ones(rt.z_dim) / rt.z_dim**0.5, "sefa", {})}
        label = 3 if rt.num_classes else None
        ops = [lambda: rt.reconstruct(ImageRequest(image=image, label=label, steps=2)),
               lambda: rt.denoise(ImageRequest(image=image, label=label, steps=2)),
               lambda: rt.inpaint(InpaintRequest(image=image, mask=mask, label=label, steps=2)),
               lambda: rt.edit(EditRequest(source=LatentSource(image=image, label=label), direction="d", alpha=1.0,
                                           projection_steps=2))]
        if preset == "vae-mnist":
            ops.append(lambda: rt.inpaint(InpaintRequest(image=image, mask=mask, method="chain")))
        else:  # a VAE's image source is encoded, not projected
            ops.append(lambda: rt.interpolate(InterpolateRequest(a=LatentSource(image=image, label=label),
                                                                 b=LatentSource(seed=2, label=label), steps=3,
                                                                 projection_steps=2)))
        for op in ops:
            assert "Cannot copy out of meta tensor" in str(runs_on_the_model_device(op))
    assert asked == ["meta"] * 3


def _guarded_loads(monkeypatch) -> list:
    from latentforge.serve import engine

    return guard_checkpoint_loads(monkeypatch, engine)


def test_generation_precision_follows_the_replicas_device(runs, monkeypatch):
    """A bf16-trained model generates in bf16 where bf16 is native, on the device it serves from."""
    from latentforge.serve import engine

    _guarded_loads(monkeypatch)
    calls = []
    monkeypatch.setattr(engine, "inference_precision", lambda trained, device_type: calls.append(device_type) or "fp32")
    engine.ModelRuntime("m", runs / "cdcgan-mnist")
    engine.ModelRuntime("m", runs / "cdcgan-mnist", device="meta")
    assert calls == ["cpu", "meta"]


def test_directions_of_a_model_on_another_device_are_computed_on_a_cpu_copy(runs, monkeypatch):
    """GANSpace feeds the model CPU latents, and a GPU's eigenvectors may differ in sign from the
    CPU Editor's: a Generator whose model sits elsewhere computes its data-free directions from a
    CPU copy of the weights in memory (its checkpoint folder may be gone or replaced by then)."""
    import shutil

    from latentforge.editing.directions import data_free_directions
    from latentforge.serve import engine

    seen = []

    def recorded(model, algorithm):
        seen.append((model, next(model.parameters()).device.type))
        return data_free_directions(model, algorithm)

    monkeypatch.setattr(engine, "data_free_directions", recorded)
    reference = engine.ModelRuntime("m", runs / "cdcgan-mnist")._data_free()
    shutil.copytree(runs / "cdcgan-mnist", runs / "evicted")
    elsewhere = engine.ModelRuntime("m", runs / "evicted")
    shutil.rmtree(runs / "evicted")  # e.g. pruned from the download cache after the load
    monkeypatch.setattr(engine, "on_device", lambda module, device: False)  # as if on a GPU
    found = elsewhere._data_free()
    copy, where = seen[-1]
    assert copy is not elsewhere.model and where == "cpu"
    assert found and sorted(found) == sorted(reference)
    for name, d in found.items():
        assert d.vector.device.type == "cpu" and torch.equal(d.vector, reference[name].vector)


def test_each_model_deployment_asks_ray_for_its_own_gpus():
    from latentforge.serve.app import build_application, replica_options

    cfg = ServeConfig(replica_cpus=1.0, replica_gpus=0.5)
    assert replica_options(cfg, "Generator") == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert replica_options(cfg, "Editor") == {"num_cpus": 1.0}  # editor_gpus: 0, its projections on CPUs
    assert replica_options(ServeConfig(), "Generator") == {"num_cpus": 0.5}
    generator, editor = build_application(cfg)._bound_deployment.init_args[:2]  # the Gateway's handles
    assert generator._bound_deployment.name == "Generator" and editor._bound_deployment.name == "Editor"
    assert generator._bound_deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert editor._bound_deployment.ray_actor_options == {"num_cpus": 1.0}
    both = build_application(ServeConfig(replica_gpus=0.5, editor_gpus=1))._bound_deployment.init_args[:2]
    assert [d._bound_deployment.ray_actor_options.get("num_gpus") for d in both] == [0.5, 1]
    for field in ("replica_gpus", "editor_gpus"):
        with pytest.raises(ValidationError, match=field):
            ServeConfig(**{field: -1})
        for more in (1.5, 2):  # a replica runs on one GPU: a second would sit idle
            with pytest.raises(ValidationError, match="a replica runs its model on one GPU.* more replicas"):
                ServeConfig(**{field: more})
        assert getattr(ServeConfig(**{field: 1}), field) == 1


@pytest.mark.parametrize("deployment,field", [("Generator", "replica_gpus"), ("Editor", "editor_gpus")])
def test_a_model_replica_runs_on_cuda_only_where_it_sees_one(monkeypatch, deployment, field):
    from latentforge.serve.app import replica_device

    assert replica_device(ServeConfig(), deployment) == "cpu"
    other = "editor_gpus" if field == "replica_gpus" else "replica_gpus"
    assert replica_device(ServeConfig(**{other: 1}), deployment) == "cpu"  # the other deployment's GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"{field}: this process sees no CUDA GPU .*set {field}: 0"):
        replica_device(ServeConfig(**{field: 1}), deployment)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert replica_device(ServeConfig(**{field: 1}), deployment) == "cuda"
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_gpu_replicas_on_a_cluster_without_gpus_are_refused_before_anything_is_deployed(monkeypatch):
    import ray
    from ray import serve

    from latentforge import ray_cluster
    from latentforge.serve.runner import check_replica_gpus, start_serve

    with pytest.raises(ConfigError, match=r"replica_gpus: 1 per Generator replica, for 1 replica\(s\) "
                                          r"\(generator.min_replicas, at least one\), asks 1 GPU\(s\) and this Ray cluster has 0: "
                                          r"set replica_gpus: 0 to serve on CPUs"):
        check_replica_gpus(ServeConfig(replica_gpus=1), 0, joined=False)
    two = ServeConfig(replica_gpus=1, generator={"min_replicas": 2})  # Serve starts both before it runs
    with pytest.raises(ConfigError, match=r"asks 2 GPU\(s\) and this Ray cluster has 1: lower "
                                          r"generator.min_replicas to 1 or replica_gpus, set replica_gpus: 0"):
        check_replica_gpus(two, 1, joined=False)
    said = []
    check_replica_gpus(ServeConfig(replica_gpus=1), 0, joined=True, log=said.append)
    assert len(said) == 1 and "wait until the cluster (its autoscaler) adds GPU nodes" in said[0]
    said.clear()
    check_replica_gpus(ServeConfig(replica_gpus=0.25), 1, joined=False, log=said.append)
    assert said == []
    # Ray packs fractions per GPU: five replicas of 0.4 need three GPUs (two per GPU), not two
    five = ServeConfig(replica_gpus=0.4, generator={"min_replicas": 5, "max_replicas": 5})
    with pytest.raises(ConfigError, match=r"asks 3 GPU\(s\) and this Ray cluster has 2: lower generator.min_replicas to 4"):
        check_replica_gpus(five, 2, joined=False)
    tenths = ServeConfig(replica_gpus=0.1, generator={"min_replicas": 30, "max_replicas": 30})
    check_replica_gpus(tenths, 3, joined=False)  # 0.1 fits ten times per GPU, float rounding or not
    # Editors count too, and share GPUs with Generators: 0.5 + 0.5 fit one GPU, 0.6 + 0.5 do not
    check_replica_gpus(ServeConfig(replica_gpus=0.5, editor_gpus=0.5), 1, joined=False)
    # two Generators of 0.4 placed first share a GPU, and two Editors of 0.6 then need one each
    mixed = ServeConfig(replica_gpus=0.4, editor_gpus=0.6, generator={"min_replicas": 2}, editor={"min_replicas": 2})
    with pytest.raises(ConfigError, match=r"ask 3 GPU\(s\) and this Ray cluster has 2"):
        check_replica_gpus(mixed, 2, joined=False)
    check_replica_gpus(mixed, 3, joined=False)
    with pytest.raises(ConfigError, match=r"replica_gpus: 0.6 per Generator replica, for 1 replica\(s\) and editor_gpus: "
                                          r"0.5 per Editor replica, for 1 replica\(s\) \(generator.min_replicas and "
                                          r"editor.min_replicas, at least one\), ask 2 GPU\(s\) and this Ray cluster has 1"):
        check_replica_gpus(ServeConfig(replica_gpus=0.6, editor_gpus=0.5), 1, joined=False)
    with pytest.raises(ConfigError, match=r"editor_gpus: 1 per Editor replica, for 3 replica\(s\) .*asks 3 GPU\(s\) "
                                          r"and this Ray cluster has 2: lower editor.min_replicas to 2 or editor_gpus"):
        check_replica_gpus(ServeConfig(editor_gpus=1, editor={"min_replicas": 3, "max_replicas": 3}), 2, joined=False)

    def deployed(*a, **k):
        raise AssertionError("deployed")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "ray_init", lambda address=None, num_cpus=None: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(serve, "start", deployed)
    with pytest.raises(ConfigError, match="has 0: set replica_gpus: 0"):
        start_serve(ServeConfig(replica_gpus=1))
    start_serve_min0 = ServeConfig(replica_gpus=1, generator={"min_replicas": 0})  # still one replica to serve a request
    with pytest.raises(ConfigError, match=r"for 1 replica\(s\) \(generator.min_replicas, at least one\)"):
        start_serve(start_serve_min0)
    with pytest.raises(ConfigError, match="has 0: set editor_gpus: 0"):
        start_serve(ServeConfig(editor_gpus=0.5))
