#!/bin/bash
# JobProxy task {{task_id}}, DRMAA scheduler (job name {{job_name}})
# requested: {{resources}}
{{run}}
