"""`whatsappd import-baileys`: move a company from the old CRM's Baileys session to whatsappd
without a new QR scan.

A Baileys 6 or 7 `useMultiFileAuthState` folder (`creds.json` plus `{type}-{id}.json` key files)
becomes a whatsmeow SQLite store that neonize loads as an already paired device:

| Baileys | whatsmeow store |
| --- | --- |
| `me`, `registrationId`, `noiseKey`, `signedIdentityKey`, `signedPreKey`, `advSecretKey`, `account`, `platform` | `whatsmeow_device` |
| `account.accountSignatureKey` (the phone's identity) | `whatsmeow_identity_keys` `USER:0` (and `LID_1:0`) |
| `pre-key-N` | `whatsmeow_pre_keys`, uploaded when N < `firstUnuploadedPreKeyId` |
| `session-NAME.DEV` (libsignal-node JSON) | `whatsmeow_sessions` `NAME:DEV` (go.mau.fi/libsignal JSON) |
| each session's remote identity, `identity-key-*` | `whatsmeow_identity_keys` |
| `sender-key-G--U--D` | `whatsmeow_sender_keys` |
| `app-state-sync-key-ID`, `app-state-sync-version-NAME` | `whatsmeow_app_state_sync_keys`, `_version`, `_mutation_macs` |
| `lid-mapping-*`, `me.lid` | `whatsmeow_lid_map` |
| `tctoken-JID` | `whatsmeow_privacy_tokens` |

What has no place there is listed in the report with why. Modules: `source` reads the folder
without changing it, `keys` checks key pairs and signatures, `signal` converts Signal records,
`convert` builds the rows, `whatsmeow` writes the store, `verify` opens it with neonize,
`importer` runs it all with the safety rules, `report` says what happened.
"""

from whatsappd.baileys.importer import DEFAULT_MIN_IDLE, PROVENANCE_FILE, RootReport, import_company, import_root
from whatsappd.baileys.report import REFUSAL_CODES, ImportReport, Refused, Unmapped

__all__ = [
    "DEFAULT_MIN_IDLE",
    "PROVENANCE_FILE",
    "REFUSAL_CODES",
    "ImportReport",
    "Refused",
    "RootReport",
    "Unmapped",
    "import_company",
    "import_root",
]
