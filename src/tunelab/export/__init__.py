from tunelab.export.exporters import FORMATS, export_run
from tunelab.export.importer import import_peft

__all__ = ["FORMATS", "export_run", "import_peft"]
