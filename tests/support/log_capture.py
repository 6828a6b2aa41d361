"""Capture every log record of the root logger while a block runs (ComfyUI reports load problems by logging)."""
import contextlib
import logging


class LogCollector(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, min_level=logging.DEBUG):
        return [r.getMessage() for r in self.records if r.levelno >= min_level]


@contextlib.contextmanager
def captured_log(level=logging.DEBUG):
    """Yields a LogCollector attached to the root logger, which is set to `level` for the block."""
    collector = LogCollector()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collector)
    root.setLevel(level)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
