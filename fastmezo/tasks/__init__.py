"""Small classification tasks built at run time from data shipped in installed packages (no download)."""
