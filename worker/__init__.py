"""The job system: torch-free job specs and store (`worker.specs`, `worker.store`), the checks of
uploaded files (`worker.files`), and the Celery worker that runs a job through `xatl.pipeline` in a
child process (`worker.tasks`, `worker.runner`)."""
