"""Fine-tuning jobs (issue 27): training data first (data.py); the job system, the trainer
and the API are to come."""
