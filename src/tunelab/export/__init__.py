from tunelab.export.exporters import FORMATS, export_run

__all__ = ["FORMATS", "export_run"]
