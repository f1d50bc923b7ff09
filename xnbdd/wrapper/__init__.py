"""xnbd-wrapper: many exports behind one NBD port, one xnbd-server process per export.

registry    the exports (validated entries) and the JSON state database
supervisor  the per-export xnbd-server processes: start on first use, hand clients over, stop
frontend    the NBD side: the fixed-newstyle handshake, then the hand-off to the export's process
control     the text control protocol spoken by xnbd-wrapper-ctl (and the original's client)
server      the composition root: listeners, control socket, signals, systemd
"""
