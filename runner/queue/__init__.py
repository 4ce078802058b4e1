"""Scale-out over Redis with RQ (DESIGN §9): submit plans, run workers, read the queue's state.

    infra submit  → validate locally → experiment id → RQ job `runner.queue.job.execute_plan(plan)`
    infra worker  → InfraWorker (RQ SimpleWorker) → guard → validate the plan → `runner.run.launch.run`

| module | holds |
|---|---|
| `connection` | Redis URLs (checked, redacted, exposure warning), the client, the bounded JSON serializer |
| `submit` | the experiment id of a submission, enqueue once (duplicates reported, failed jobs replaced) |
| `job` | the job function `execute_plan` and `InfraJob`, the guard that refuses every other job |
| `worker` | `WorkerConfig`, `InfraWorker` (two-stage stop), retry policy, heartbeats, `run_worker` |
| `pool` | one worker process per GPU slot |
| `status` | `infra queue status`: counts, workers, heartbeats (untrusted documents skipped with a note) |

Redis write access is the right to run plans on every worker; see docs/security.md. This
package imports neither redis nor rq until a function needs them (`infra --help` stays fast).
"""
