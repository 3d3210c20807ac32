"""The report: Tables 2 and 3, the figures and the pages, from the transfer results.

Import direction inside: tables (frames and statistics) <- figures <- page <- build (the shell).
"""
