"""The study: IMP jobs, the transfer arms, tuning; each a resumable job over the core (training, pruning).

Import direction inside: step (one tracked fit-and-test) <- imp <- transfer <- tune_tickets <- tune.
"""
