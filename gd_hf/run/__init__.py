"""A run: the launch and its phases (`launch.TrainingRecipe`), the set-up of a phase (`set_up`), what one phase
trains with (`phase.Phase`), the loop (`loop`), the work done every N steps (`periodic`: log line, evaluation,
pictures, curves, best export, checkpoint), one optimizer step (`step`), AdamW and the schedule (`optim`),
checkpoints and resume (`checkpointing`), the launch records and the output folder's locks (`launches`), the
metrics log (`metrics_log`), the trackers (`trackers`), what each evaluation draws (`eval_pictures`), the exports
and pushes of a run (`publisher`), and several processes (`distributed`). The command is `python -m gd_hf.train`
(`gd_hf.train`)."""
