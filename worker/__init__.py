"""The job pipeline's worker side: uploaded files checked and stored (`worker.files`); Celery tasks."""
