"""Training metrics exported through Ray's metrics agent (Prometheus names get a `ray_` prefix;
counters also a `_total` suffix). The dashboards in dashboards/ are built on these names."""

from __future__ import annotations

from latentforge.metrics.registry import REPORTED_METRICS

LOSS_KEYS = ("d_loss", "g_loss", "loss", "nll", "kl", "gp", "r1")
GRAD_KEYS = ("grad_norm_d", "grad_norm_g", "grad_norm")
EVAL_KEYS = tuple(REPORTED_METRICS)  # `latentforge_eval_metric{name=...}`: every metric periodic evaluation reports


class TrainMetrics:
    """Chief-side gauges and counters, tagged with the run name and algorithm."""

    def __init__(self, run: str, algorithm: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run, "algorithm": algorithm}
        keys = ("run", "algorithm")
        self.images = Counter("latentforge_train_images", "Training images processed (all workers)", tag_keys=keys)
        self.throughput = Gauge("latentforge_train_images_per_second", "Global training throughput", tag_keys=keys)
        self.step_time = Gauge("latentforge_train_step_seconds", "Mean wall time of a training step", tag_keys=keys)
        self.step = Gauge("latentforge_train_step", "Last completed training step", tag_keys=keys)
        self.loss = Gauge("latentforge_train_loss", "Training losses by name", tag_keys=keys + ("name",))
        self.grad = Gauge("latentforge_train_grad_norm", "Gradient norms by network", tag_keys=keys + ("name",))
        self.eval = Gauge("latentforge_eval_metric", "Periodic evaluation metrics by name", tag_keys=keys + ("name",))
        self._last_images = 0

    def update(self, record: dict) -> None:
        # images this attempt processed: a restarted attempt's counter starts at 0 (a new process)
        # and counts on from there, instead of adding every image of the attempts before it at once
        seen = int(record.get("attempt_images", 0))
        if seen > self._last_images:
            self.images.inc(seen - self._last_images, tags=self.tags)
            self._last_images = seen
        self.throughput.set(record["images_per_sec"], tags=self.tags)
        self.step_time.set(record["step_time_s"], tags=self.tags)
        self.step.set(record["step"], tags=self.tags)
        for group, keys in ((self.loss, LOSS_KEYS), (self.grad, GRAD_KEYS), (self.eval, EVAL_KEYS)):
            for k in keys:
                if k in record:
                    group.set(float(record[k]), tags={**self.tags, "name": k})
