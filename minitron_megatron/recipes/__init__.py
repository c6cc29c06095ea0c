"""One function per command that is more than one library call: `evaluate`, `prune`
(importance + trim on one loaded model) and `run` (the whole recipe). `train` and
`distill` are `train.loop.pretrain` and `distill.loop.distill`.

Each takes the command's typed config and a ParallelContext and returns the JSON
summary; `cli/` composes the config and starts the runtime around them.
"""
