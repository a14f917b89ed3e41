"""Progress, metrics log, pipeline timeline traces and plots."""
