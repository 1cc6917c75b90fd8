from tunelab.cli.main import app

app(prog_name="tunelab")
