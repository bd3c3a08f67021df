"""The trainer: the plan, the run set-up, the loop, validation and its scores, held-out loss, stopping, the command."""
