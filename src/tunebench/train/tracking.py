"""Optional experiment trackers (TensorBoard, Weights & Biases), enabled by train.report_to."""

from __future__ import annotations

from pathlib import Path

from tunebench.config import public_url
from tunebench.errors import ConfigError


class Trackers:
    def __init__(self, names: list[str], run_root: Path, config: dict):
        self.writers = []
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ConfigError("report_to tensorboard needs: pip install 'tunebench[tensorboard]'") from exc
                self.writers.append(("tensorboard", SummaryWriter(str(run_root / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError as exc:
                    raise ConfigError("report_to wandb needs: pip install 'tunebench[wandb]'") from exc
                # The API key comes from WANDB_API_KEY or `wandb login`, never from the config; the
                # config goes to wandb's servers, so URL credentials are dropped (as in config.yaml).
                judge = config.get("judge") or {}
                if judge.get("base_url"):
                    config = {**config, "judge": {**judge, "base_url": public_url(judge["base_url"])}}
                self.writers.append(("wandb", wandb.init(project="tunebench", name=run_root.name, config=config)))

    def log(self, record: dict, step: int) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, step)
            else:
                writer.log(record, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            writer.close() if kind == "tensorboard" else writer.finish()
