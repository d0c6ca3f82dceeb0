"""User data into records: file reading with errors that name the row, tables, instruction records,
prompt styles, text corpora as token files, and how a classifier reads texts.
"""
