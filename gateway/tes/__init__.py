"""The GA4GH TES 1.1 API: handlers (api), request -> Task (request), the three views (documents),
and the job-side steps script (steps)."""
