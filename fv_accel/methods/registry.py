"""The one method registry: ``method.name`` → the :class:`~fv_accel.methods.base.TrainingMethod` subclass.

Every method registers the same way, with the :func:`register_method` decorator on its class; the built-in ones
are the modules :mod:`fv_accel.methods` imports, a project's own are the modules the run's ``plugins`` key names
(imported by :func:`fv_accel.config.resolve_config` before the configuration is validated). ``config.py`` reads
this registry to validate ``method`` (each method's ``Config``) and to apply its role rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fv_accel.methods.base import TrainingMethod

METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: make ``cls`` the method selected by ``method.name: <cls.name>``.

    Its ``Config`` must select it by the same name (``name: Literal["<cls.name>"]``). Registering a second,
    different class under a name already taken is an error (two plugins would silently shadow each other)."""
    name = cls.name
    tag = cls.Config.model_fields["name"].annotation
    if getattr(tag, "__args__", None) != (name,):
        raise TypeError(f"{cls.__name__}.Config.name must be Literal[{name!r}] (got {tag})")
    known = METHODS.get(name)
    if known is not None and known is not cls and (known.__module__, known.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise TypeError(f"method {name!r} is registered twice: {known.__module__}.{known.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[TrainingMethod]:
    """The registered class of ``method.name``; KeyError naming the registered ones when there is none."""
    import fv_accel.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        raise KeyError(f"no method named {name!r} (registered: {', '.join(sorted(METHODS))}; a project's own "
                       "method is imported through the config's plugins key)")
    return METHODS[name]
