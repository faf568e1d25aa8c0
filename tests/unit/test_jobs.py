"""Job specs (`python jobs/<kind>.py SPEC.yaml`): what a spec names is read before the job starts,
so a mistake in it is a bad spec (exit 2) rather than a failed job (exit 1) found on the cluster."""

import pytest

from latentforge.jobs import main


def test_a_bad_sweep_or_override_is_a_bad_spec(tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text("name: s\nbase: dcgan-mnist\nspace:\n  gan.lr_gg: {choice: [1.0e-4]}\n")
    (tmp_path / "tune.yaml").write_text(f"sweep: {tmp_path / 'sweep.yaml'}\ndata: {{dir: {tmp_path / 'd'}}}\n")
    assert main("tune", [str(tmp_path / "tune.yaml")]) == 2
    assert "bad spec" in capsys.readouterr().err
    (tmp_path / "train.yaml").write_text(f"preset: dcgan-mnist\noverrides: {{gan.lr_gg: 1}}\ndata: {{dir: {tmp_path / 'd'}}}\n")
    assert main("train", [str(tmp_path / "train.yaml")]) == 2
    assert "gan.lr_gg" in capsys.readouterr().err


def test_a_tune_job_resumes_only_a_named_sweep_folder(tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text("name: s\nbase: dcgan-mnist\nspace:\n  gan.lr_g: {choice: [1.0e-4]}\n")
    (tmp_path / "tune.yaml").write_text(f"sweep: {tmp_path / 'sweep.yaml'}\ndata: {{dir: {tmp_path / 'd'}}}\nresume: true\n")
    assert main("tune", [str(tmp_path / "tune.yaml")]) == 2
    assert "resume: true continues the sweep folder in out; set out" in capsys.readouterr().err


def test_a_tune_jobs_resume_reaches_the_sweep(mnist_dir, tmp_path, monkeypatch):
    import latentforge.tune.sweep as sweep
    from latentforge.jobs import load_spec, run

    (tmp_path / "sweep.yaml").write_text("name: s\nbase: dcgan-mnist\nspace:\n  gan.lr_g: {choice: [1.0e-4]}\n")
    (tmp_path / "tune.yaml").write_text(f"sweep: {tmp_path / 'sweep.yaml'}\ndata: {{dir: {mnist_dir}}}\n"
                                        f"out: {tmp_path / 's'}\nresume: true\n")
    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: seen.update(k) or {})
    run("tune", load_spec("tune", str(tmp_path / "tune.yaml")))
    assert seen["resume"] is True and seen["out"] == str(tmp_path / "s")


def test_a_node_without_the_dataset_prepares_it_once_and_checks_it_is_the_drivers(tmp_path):
    """A cluster job's workers on another machine do not see the folder the driver prepared: each
    node prepares the built-in source itself, once however many workers start there, and refuses a
    folder whose content is not the driver's."""
    import threading

    from latentforge.data.dataset import PreparedDataset
    from latentforge.data.prepare import ensure_prepared
    from latentforge.errors import DataError

    folder = tmp_path / "node" / "digits"
    said = []
    workers = [threading.Thread(target=ensure_prepared, args=(folder, "digits"), kwargs={"log": said.append})
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len([m for m in said if "preparing digits" in m]) == 1
    digest = PreparedDataset(folder).content_hash
    ensure_prepared(tmp_path / "other" / "digits", "digits", digest, log=lambda *_: None)  # the same bytes anywhere
    with pytest.raises(DataError, match="is not the one the run was started with"):
        ensure_prepared(folder, "digits", "sha256:" + "0" * 64, log=lambda *_: None)


def test_a_deploy_spec_whose_key_file_is_missing_is_a_bad_spec(tmp_path, capsys):
    (tmp_path / "deploy.yaml").write_text(f"serve: {{registry: {tmp_path / 'r'}, api_key_file: {tmp_path / 'nokey'}}}\n")
    assert main("deploy", [str(tmp_path / "deploy.yaml")]) == 2
    assert "nokey" in capsys.readouterr().err


def test_a_bad_serve_section_is_named_without_echoing_its_api_key(tmp_path, capsys):
    (tmp_path / "deploy.yaml").write_text(f"serve: {{registry: {tmp_path / 'r'}, api_key: s3cr3t-token-value-xyz, "
                                          "projection_steps: 600}\n")
    assert main("deploy", [str(tmp_path / "deploy.yaml")]) == 2
    err = capsys.readouterr().err
    assert "projection_steps (600) is above" in err and "s3cr3t" not in err


def test_a_key_of_the_wrong_type_is_named_without_its_value(tmp_path, capsys):
    (tmp_path / "deploy.yaml").write_text(f"serve: {{registry: {tmp_path / 'r'}, api_key: 8675309012345}}\n")
    assert main("deploy", [str(tmp_path / "deploy.yaml")]) == 2
    err = capsys.readouterr().err
    assert "serve.api_key" in err and "8675309012345" not in err
