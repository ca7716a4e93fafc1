"""Shared start-up of the entry scripts: arguments, config, logging, seeding, error reporting.

Every script is ``launch(main, description)``: it parses ``--config-file FILE.yaml``, trailing
``KEY VALUE`` overrides and ``--debug``, builds the frozen config, calls ``main(cfg, args)`` and
turns any failure into one ``ERROR: ...`` line and a non-zero exit (the traceback only with
``--debug``).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
import warnings
from typing import Callable, NoReturn, Optional, Sequence

import numpy as np
from tqdm import tqdm
from yacs.config import CfgNode as CN

from config import ConfigError, load_cfg
from utils.io import atomic_write_text

__all__ = [
    "configure_process",
    "default_argument_parser",
    "setup_logging",
    "add_log_file",
    "save_config",
    "seed_everything",
    "launch",
    "pause_point",
]

LOG_FORMAT = "[%(asctime)s %(name)s] %(levelname)s: %(message)s"
CONSOLE_FORMAT = "[%(asctime)s] %(message)s"
EXIT_ERROR = 1
EXIT_USAGE = 2


def configure_process(models: bool = True) -> None:
    """The process-wide settings of the entry scripts, set once by them at start (no module of
    the toolkit changes anything global on import):

    * deprecation notices of third-party internals (torch.jit, weight_norm used by fastai) are
      hidden: they say nothing actionable to a user of the scripts;
    * matplotlib draws without a display (``Agg``; through ``MPLBACKEND`` when it is not
      imported yet, so a script that draws nothing does not load it);
    * with ``models`` (scripts that build models): huggingface_hub's own console handler is
      dropped: its loggers also propagate to the root logger, so every line of it (download
      retries...) printed twice; ours print them once.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*weight_norm.*")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if "matplotlib" in sys.modules:
        sys.modules["matplotlib"].use("Agg")
    if not models:
        return
    try:
        import huggingface_hub.utils.logging as hub_logging
    except ImportError:  # pragma: no cover - a dependency of timm
        return
    root = hub_logging._get_library_root_logger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.propagate = True


class _ConsoleFormatter(logging.Formatter):
    """``[time] message``, with ``ERROR: `` before errors (the log file's format names the
    level itself, so the message never carries it: no ``ERROR: ERROR:`` in log.txt)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.levelno >= logging.ERROR:
            prefix = f"[{record.asctime}] "
            return prefix + "ERROR: " + text[len(prefix):] if text.startswith(prefix) else "ERROR: " + text
        return text


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints above progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Config: the defaults are config/defaults.py (every key commented). A YAML file\n"
            "given with --config-file overrides them, and trailing KEY VALUE pairs override\n"
            "both, e.g.  INPUT.SIZE_TRAIN 512 DATASETS.TRAIN_FOLDER out/tiles"
        ),
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML config to merge")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. SOLVER.MAX_EPOCHS 5",
    )
    return parser


def setup_logging(debug: bool = False) -> logging.Logger:
    """Console logging for the whole process (idempotent)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler(sys.stderr)
        handler.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    for noisy in ("tifffile", "PIL", "matplotlib", "asyncio", "numcodecs", "zarr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    return root


def add_log_file(folder: str, name: str = "log.txt") -> str:
    """Also log to ``folder/name`` (appended, so earlier runs' logs are kept)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.abspath(os.path.join(folder, name))
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and h.baseFilename == path:
            return path
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    return path


def save_config(cfg: CN, path: str) -> None:
    """Write the merged config as YAML (atomically); it can be fed back with --config-file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, cfg.dump())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a requirement
        return
    torch.manual_seed(seed)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    text = " ".join(text.split())
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        if exc.filename and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
    return text


def launch(
    main: Callable[[CN, argparse.Namespace], object],
    description: str,
    argv: Optional[Sequence[str]] = None,
    default_config: str = "",
) -> int:
    """Parse, configure and run ``main``; return the process exit code. ``default_config`` is
    the YAML used when no ``--config-file`` is given."""
    parser = default_argument_parser(description)
    if default_config:
        parser.set_defaults(config_file=default_config)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    log = logging.getLogger("glomeruli")
    try:
        cfg = load_cfg(args.config_file or None, args.opts)
    except ConfigError as exc:
        if args.debug:
            log.exception("config error")
        log.error("%s", _one_line(exc))
        return EXIT_USAGE
    try:
        main(cfg, args)
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
    except Exception as exc:  # one clear line; the traceback only on request
        if args.debug:
            log.exception("failed")
        log.error("%s", _one_line(exc))
        return EXIT_ERROR
    return 0


PAUSE_ENV = "GLOMERULI_PAUSE_AT"
_pause_counts: dict = {}


def pause_point(name: str) -> None:
    """A named point where a test can stop the process deterministically (to kill it there).

    With the environment variable ``GLOMERULI_PAUSE_AT=<name>@<n>`` (``@1`` by default), the
    ``n``-th time the process reaches ``name`` it writes ``paused <name> <n>`` to the file
    ``GLOMERULI_PAUSE_FILE`` (when set) and sleeps until killed. Without the variable it costs a
    dictionary lookup. Points: ``tiler.tile_row``, ``tiler.slide_done``, ``test_net.item_done``,
    ``training.state_saved``."""
    target = os.environ.get(PAUSE_ENV)
    if not target:
        return
    wanted, _, nth = target.partition("@")
    if wanted != name:
        return
    count = _pause_counts[name] = _pause_counts.get(name, 0) + 1
    if count != int(nth or 1):
        return
    marker = os.environ.get("GLOMERULI_PAUSE_FILE")
    if marker:
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(f"paused {name} {count}\n")
    while True:  # until the test's SIGKILL
        time.sleep(3600)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` at once, once the logs and standard streams are flushed.

    For entry scripts whose outputs are all written (atomically) and closed by then: Python's
    normal shutdown tears down every imported module, which with torch, timm and smp loaded
    takes ~1.2 s on 2 cores (measured: ``import model.prediction, segmentation_models_pytorch``
    4.3 s with a normal exit, 3.0 s with this one) after the work is done.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to say there
            pass
    os._exit(code)
