"""Reports: schema.py (the typed, versioned report.json records), writer.py (the one writer and
reader of report.json / report.md), markdown.py (every Markdown view), formatting.py (the one
number formatter), provenance.py (versions, command line, sanitised sources), analysis.py
(compare / report over many runs), masks.py, plots.py, model_card.py."""
