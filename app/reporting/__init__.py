"""Statistics and reports: bootstrap intervals, paired comparisons, report.md, reproduction.md, sweep reports and
the published numbers they are compared with."""
