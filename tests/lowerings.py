"""The programs JAX lowers inside a block, by name (jax.monitoring's lowering event): a block
that only runs what was compiled ahead lowers none."""
import contextlib

from jax import monitoring

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def lowered_programs():
  names: list[str] = []

  def listen(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == LOWERING_EVENT:
      names.append(str(kwargs.get("fun_name", "")))

  monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    monitoring.unregister_event_duration_listener(listen)
