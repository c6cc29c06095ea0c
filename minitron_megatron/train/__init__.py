"""Training-loop pieces shared by train and distill: optimizer, DDP, schedules, eval, logging."""
