"""Turning NIfTI series and radiology reports into training records (``decipher prep``)."""
