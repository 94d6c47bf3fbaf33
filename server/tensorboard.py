"""TensorBoard event files under the run folder (``run.tensorboard: true``)."""

from __future__ import annotations

from pathlib import Path

from lssfl.common.records import RoundRecord

FOLDER = "tensorboard"


class TensorBoardLog:
    """Writes each committed round's figures as scalars, step = round number.

    Global: ``global/accuracy``, ``global/loss``, ``bytes/down``, ``bytes/up``. Per silo:
    ``silo/<id>/bytes_down``, ``silo/<id>/bytes_up`` and each metric the silo reported
    (``silo/<id>/train_loss`` ...). With evaluation at the silos, ``silo/<id>/eval_accuracy``
    and ``silo/<id>/eval_loss``; a round's record then comes a second time, once the silos
    have measured its model, and only the measures are written again.
    """

    def __init__(self, run_dir: Path) -> None:
        # torch imports tensorboard here; the config check says what to install when missing.
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_dir / FOLDER
        self._writer = SummaryWriter(str(self.folder))
        self._written: set[int] = set()  # rounds whose bytes and training figures are written

    def add(self, record: RoundRecord) -> None:
        """Write one round and flush, so that a running TensorBoard shows it at once."""
        step, w = record.round, self._writer
        if record.global_accuracy is not None and record.global_loss is not None:
            w.add_scalar("global/accuracy", record.global_accuracy, step)
            w.add_scalar("global/loss", record.global_loss, step)
        for e in record.evaluations:
            w.add_scalar(f"silo/{e.silo_id}/eval_accuracy", e.accuracy, step)
            w.add_scalar(f"silo/{e.silo_id}/eval_loss", e.loss, step)
        if step in self._written:
            w.flush()
            return
        self._written.add(step)
        w.add_scalar("bytes/down", record.bytes_down, step)
        w.add_scalar("bytes/up", record.bytes_up, step)
        for silo in record.silos:
            w.add_scalar(f"silo/{silo.silo_id}/bytes_down", silo.bytes_down, step)
            w.add_scalar(f"silo/{silo.silo_id}/bytes_up", silo.bytes_up, step)
            for name, value in silo.train_metrics.items():
                w.add_scalar(f"silo/{silo.silo_id}/{name}", value, step)
        w.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
