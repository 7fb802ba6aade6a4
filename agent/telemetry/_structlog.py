"""structlog, loaded without rich and colorama: the one place the agent imports it from."""

import sys

# structlog imports rich and colorama when they are installed (rich comes with the [demo] extra): ~3.5 MB of
# pretty tracebacks, locals and Windows colours that the daemon never uses (exceptions become text or dicts,
# show_locals=False, before any renderer sees them; ANSI colours need no colorama off Windows). Hidden while
# structlog loads, so that it falls back to its plain formatters; a later `import rich` works as usual.
_HIDDEN = [name for name in ("rich", "colorama") if name not in sys.modules]
for _name in _HIDDEN:
    sys.modules[_name] = None  # type: ignore[assignment]  # None in sys.modules: the import raises ImportError
try:
    import structlog
    from structlog.processors import ExceptionRenderer
    from structlog.tracebacks import ExceptionDictTransformer
    from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger
finally:
    for _name in _HIDDEN:
        del sys.modules[_name]


__all__ = [
    "EventDict",
    "ExceptionDictTransformer",
    "ExceptionRenderer",
    "FilteringBoundLogger",
    "Processor",
    "WrappedLogger",
    "structlog",
]
