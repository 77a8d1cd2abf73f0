"""The wiring: the one place besides the entry points in `goca_fast.cli` that reads a whole `Config`.

`settings` turns each config section into the plain settings object its stage takes (pure, no I/O); `run` plans a
pretraining run once (`plan_run`: device, AMP, dataset, index) and builds the trainer and monitor from that plan;
`loaders` builds its training loader; `evaluation` does the same for a checkpoint that is evaluated. Data, model,
engine and eval code never see a config, so data flows one way:
config -> plan -> data -> model -> assign -> loss -> engine.
"""
