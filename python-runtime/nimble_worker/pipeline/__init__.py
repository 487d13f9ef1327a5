"""Pipeline parallelism, the worker side (issue 20): the model's top-level layers split
into S contiguous stages (`split`), micro-batches flowing through them in a schedule
(`schedule`), activations and their gradients packed for the wire (`codec`), a stage's
replica (`stage_replica`) and the layers' costs for planning the split (`profile`). The
strategy itself is strategies/pipeline.py."""
