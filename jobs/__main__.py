from facegen.jobs.cli import run

run()
