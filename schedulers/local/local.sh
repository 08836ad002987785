#!/bin/bash
# JobProxy task {{task_id}}, local scheduler
# requested: {{resources}}
{{run}}
