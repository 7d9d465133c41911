"""Reports: the HTML audit report, Markdown/LaTeX sanity tables, figures, and the registry of
output writers (:mod:`fvsanity.report.writers`). Import the module you need; nothing is loaded
here (matplotlib only where a figure is drawn)."""

__all__ = ["attribution_graph", "html", "path_figure", "tables", "writers"]
