#!/bin/bash
# JobProxy task {{task_id}}, Slurm scheduler
# requested: {{resources}}
# Slurm copies the submitter's rlimits into a job by default; the gateway's own are no job's business:
#SBATCH --propagate=NONE
{{directives}}
{{run}}
