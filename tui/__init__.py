"""The Textual dashboard over a run store. Not built yet: see the README's "What works today"."""
