"""Studies and probes of the shapes demo (docs/demo.md): not part of the product; svg_jax never
imports this package. research/NOTES.md lists what each one measures and its command."""
