"""The offline shapes demo (docs/design.md, "Offline default"): its dataset (shapes), text encoder
(text_encoder), decoder input files (decoder_data), configs, scorer (geneval), evaluation
(evaluate) and the end-to-end run (pipeline), which calls the trainer like any user.

Nothing outside this package and its launchers imports it: the trainer does not know the demo
exists."""
