"""Online backup and restore of a state directory (`whatsappd backup`, `whatsappd restore`,
`POST /v1/backup`, `whatsappctl backup`).

`archive.py` is the archive format (manifest, checksums, reading and verifying); `snapshot.py`
takes consistent snapshots of live stores into one archive; `restore.py` puts an archive back
into a stopped state directory (or single stopped companies); `commands.py` holds the bodies of
the command-line subcommands.
"""
