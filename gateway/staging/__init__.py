"""Staging of TES inputs and outputs by the gateway itself (`[staging]`).

Inputs with an http(s):// or s3:// URL are fetched into the task's folder on the shared task root
while the task is INITIALIZING, before its job is submitted; outputs to such URLs are sent after
the job ended and before the task's final state is written. So compute nodes need no network,
and credentials never reach a job: they stay in the gateway's configuration.

- `stager`: the staging phases of a task, hooked into the poller (`Poller.held` keeps a task
  that is being staged in from being submitted; `Poller.defer_final` lets the outputs be sent
  before COMPLETE is written), with recovery after a restart.
- `runner`: limits (bytes per task), a timeout per try, retries with exponential backoff for
  passing failures, and a bound on the transfers running at once.
- `local`: the task-root side: where a private path lives, safe reading (never through a
  symbolic link, never out of the task's folder), wildcard matching, writes that only appear
  whole.
- `http`, `s3`: one module per scheme, streaming in chunks: a file is never held in memory whole.
- `reach`: the hosts http(s) staging may connect to: public addresses, and what
  `[staging.http] allow_hosts` names (a task's URL must not reach into the gateway's network).

file:// inputs and outputs stay with the job's steps script (`gateway.tes.steps`): they lie on the
file system the nodes share, and copying them as the job's own account keeps the file system's
permissions in force (the gateway, often root, would read and write anything under `[paths]`).
"""
