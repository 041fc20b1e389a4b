"""Worker processes: the data path on every core, one supervisor for what must be single.

`count` resolves `--workers`, `codec` frames the supervisor <-> worker messages, `view`
turns the supervisor's cluster decisions into a snapshot and applies it in a worker,
`shared` is the in-flight table in shared memory, `supervisor` and `worker` are the
drivers.
"""
