"""The declared schema of a checkpoint's content: envelope, ``meta`` and handler configuration.

:func:`check_envelope` runs on every envelope read from disk (``read_checkpoint``), before any
value of it is used; :func:`check_config` validates the handler configuration
(``state["config"]``) that :meth:`NNHandler.load <nnhandler.NNHandler.load>` builds a handler
from, and that ``nnhandler verify`` / ``list`` check to call a file loadable. References in the
configuration are checked for form here (nothing is looked up or imported); they are resolved
later under the rules of :mod:`.refs`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..components.callables import FunctionSpec, ModuleSpec
from ..config import TrainSettings
from ..errors import CheckpointFormatError, CheckpointSchemaError, UnresolvableReferenceError
from .refs import check_reference
from .schema import LogValue, Schema, validate

__all__ = ["ConfigRecord", "EnvelopeRecord", "FormatRecord", "MetaRecord", "check_config",
           "check_contents", "check_envelope", "check_references"]

NonNegative = Annotated[int, Field(ge=0)]


class FormatRecord(Schema):
    name: str
    version: int


class MetaRecord(Schema):
    """``meta``: where the checkpoint stands and who wrote it."""

    epoch: NonNegative
    step: NonNegative
    logs: dict[str, LogValue]
    world_size: Annotated[int, Field(ge=1)]
    versions: dict[str, str]
    time: str
    #: the run (and its resumes) that wrote the file; absent in files of older versions
    lineage: str | None = None


class EnvelopeRecord(Schema):
    format: FormatRecord
    meta: MetaRecord
    state: dict[str, Any]
    #: tensors over the packs of small storages (:mod:`.packing`), where the file has any
    #: and a reader has not split them off yet
    packs: list[Any] = []


class ComponentRecord(Schema):
    """An optimizer or scheduler: its class and constructor arguments."""

    cls: str | None = Field(alias="class")
    kwargs: dict[str, Any]



class SchedulerRecord(ComponentRecord):
    interval: Literal["epoch", "step"]


class LoaderRecord(Schema):
    config: dict[str, Any]
    extra: dict[str, Any]


Callable = Annotated[FunctionSpec | ModuleSpec, Field(discriminator="kind")]


class ConfigRecord(Schema):
    """``state["config"]``: everything :meth:`NNHandler.load` rebuilds a handler from."""

    model_class: str | None
    model_kwargs: dict[str, Any]
    model_kwargs_unstored: list[str]
    compile_model: bool | dict[str, Any]
    parallelism: Literal["ddp", "fsdp", "none"] = "ddp"
    fsdp_units: list[str | None] = []
    optimizer: ComponentRecord | None
    scheduler: SchedulerRecord | None
    loss_fn: Callable | None
    metrics: dict[str, Callable | None]
    loaders: dict[Literal["train", "val"], LoaderRecord]
    train_settings: TrainSettings
    own_autosave: str | None = None



def check_envelope(envelope: Any, path: str) -> EnvelopeRecord:
    """The (migrated) envelope of ``path`` validated: top level, ``format``, ``meta`` and a
    ``state`` dict keyed by strings."""
    return validate(EnvelopeRecord, envelope, where="envelope", path=path)


def check_config(config: Any, path: str) -> ConfigRecord:
    """``state["config"]`` of ``path`` validated against :class:`ConfigRecord`."""
    if config is None:
        raise CheckpointFormatError(f"{path!r} has no handler configuration ('config')")
    return validate(ConfigRecord, config, where="state['config']", path=path)


def check_references(config: ConfigRecord, path: str) -> None:
    """Every class and function reference of ``config`` is well formed (``module:QualName``,
    no dunder parts); nothing is looked up. An :class:`~nnhandler.UnresolvableReferenceError`
    names the file and the field otherwise."""
    fields: list[tuple[str, str | None]] = [
        ("model_class", config.model_class),
        *((f"fsdp_units[{i}]", unit) for i, unit in enumerate(config.fsdp_units)),
        ("optimizer.class", config.optimizer.cls if config.optimizer else None),
        ("scheduler.class", config.scheduler.cls if config.scheduler else None),
        ("loss_fn.ref", config.loss_fn.ref if config.loss_fn else None),
        *((f"metrics[{name!r}].ref", spec.ref if spec else None)
          for name, spec in config.metrics.items()),
    ]
    for field, reference in fields:
        if reference is None:
            continue
        try:
            check_reference(reference)
        except UnresolvableReferenceError as error:
            raise UnresolvableReferenceError(
                f"{path!r}: state['config'].{field}: {error}") from None


def check_contents(state: Any, path: str) -> None:
    """What :meth:`NNHandler.load` would refuse, found without building anything: the
    configuration and its references, and the schemas of the handler's own components
    (history, progress, random streams). Model and optimizer tensors are checked against the
    live model only when loading. Raises a :class:`~nnhandler.CheckpointError` subclass."""
    from ..components.history import History, Progress
    from ..components.rng_record import check_rng_state
    from .schema import relocate

    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path!r}: its state is not a dict")
    check_references(check_config(state.get("config"), path), path)
    for key, check in (("history", History.check_state), ("progress", Progress.check_state),
                       ("rng", check_rng_state)):
        if key in state:
            try:
                check(state[key])
            except CheckpointSchemaError as error:
                raise relocate(error, prefix=f"state[{key!r}]", path=path) from None
