"""The error catalog and the exception tree.

Every error the hub or the agent reports carries a stable code from ``CATALOG``. The code,
message, causes and fixes are what ``outpost explain`` prints, and what the hub puts in the
body of every error response.

Exception tree::

    OutpostError            an expected failure with a catalog code (bad input, a refusal,
     |                      an unreachable hub); ``except OutpostError`` is safe
     +-- HubRefused         the hub answered with an error body (carries status and reason)
     +-- TransportError     the hub could not be reached (carries the kind of failure)
     +-- hub.db.DatabaseUnavailable
                            the hub's database could not be reached, for a while (E3007,
                            answered 503 with Retry-After; carries the kind of failure)

Misuse of the programming interface raises ``TypeError``/``ValueError`` as usual and is never
an ``OutpostError``, so catching ``OutpostError`` never hides a bug.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Entry:
    code: str
    name: str
    message: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]
    http_status: int = 400
    scenario: str | None = None
    # Other codes that name this entry exactly, such as a numeric code that a seed's
    # service shows for the same failure; 'outpost explain' finds the entry by them.
    aliases: tuple[str, ...] = ()


FORBIDDEN_TEXT = "Forbidden: You don't have permission to access / on this server."
ALREADY_REGISTERED_TEXT = "Machine is already registered"
ACTIVATE_FAILED_TEXT = ("The job action 'Activate' cannot be run, because the process stopped "
                        "unexpectedly. The job action was attempted three times.")
INVALID_HOSTNAME_TEXT = (
    "invalid hostname. Hostname cannot be empty or greater than 64 characters"
)

_ENTRIES: tuple[Entry, ...] = (
    # --- registration and request authentication (1xxx) -----------------------------------
    Entry(
        "E1001", "unknown_account", FORBIDDEN_TEXT,
        ("The account id given to 'outpost agent register' does not exist on this hub.",
         "The account was deleted, or the id was copied from another hub."),
        ("Copy the account id from 'outpost account list' (or the output of "
         "'outpost hub init') and register again.",),
        403, "HW-4"),
    Entry(
        "E1002", "bad_signature", FORBIDDEN_TEXT,
        ("The account key used to sign the registration is wrong: mistyped, truncated, "
         "or regenerated since it was copied.",),
        ("Show the current keys with 'outpost account keys ACCOUNT_ID' and register again "
         "with the primary or the secondary key.",),
        403, "HW-4"),
    Entry(
        "E1003", "clock_skew", FORBIDDEN_TEXT,
        ("The machine's clock and the hub's clock are more than 15 minutes apart, so the "
         "signed request is treated as stale.",),
        ("Synchronise the machine's clock (for example 'timedatectl set-ntp true' or "
         "'chronyc makestep') and register again.",),
        403, "HW-4"),
    Entry(
        "E1004", "already_registered", ALREADY_REGISTERED_TEXT,
        ("This state directory already holds a registration, or the account already has a "
         "machine of this name.",),
        ("Run 'outpost agent deregister' first, or pass --force to replace the registration.",
         "Pick another name with --name if this is a different machine."),
        409, "HW-10"),
    Entry(
        "E1005", "invalid_hostname", INVALID_HOSTNAME_TEXT,
        ("The machine name is empty or longer than 64 characters. The default name is the "
         "host name, so a long host name gives a long machine name.",),
        ("Pass a name of 1 to 64 characters with --name.",),
        422, "ED-7"),
    Entry(
        "E1006", "tls_untrusted_issuer",
        "The certificate presented by the hub was not issued by the expected authority. "
        "A proxy may be intercepting TLS.",
        ("A proxy between this machine and the hub is intercepting TLS and presents its "
         "own certificate.",
         "The hub's certificate authority was replaced after this machine registered.",
         "The URL points at a different server than the hub."),
        ("Let the hub's address bypass TLS inspection on the proxy (or use a proxy that "
         "tunnels with CONNECT without intercepting).",
         "If the hub's CA really changed, register again with the new --ca-fingerprint "
         "(shown by 'outpost hub init' on the hub)."),
        495, "HW-7"),
    Entry(
        "E1007", "agent_outdated",
        "The agent is out of date (The specified class does not exist).",
        ("The hub requires a newer agent version than the one installed on this machine.",),
        ("Upgrade the agent on this machine to the version the hub names ('pip install "
         "--upgrade outpost-fleet' in its venv, or run the install line of 'outpost machine "
         "install-line' again), then restart it.",),
        426, "HW-5"),
    Entry(
        "E1008", "machine_unknown",
        "The hub does not know this machine or could not verify its signature.",
        ("The machine was removed on the hub ('outpost machine remove') or deregistered.",
         "The machine key in the state directory was replaced."),
        ("Register the machine again: 'outpost agent register ... --force'.",),
        401, None),
    Entry(
        "E1009", "replayed_request",
        "The request was refused because its nonce was already used.",
        ("A copy of an earlier signed request was sent again (a replay), or a proxy "
         "retried a request on its own.",
         "A registration without a nonce, from an agent older than the hub."),
        ("Nothing to do when it happens once; the agent signs every request afresh. If it "
         "repeats, look for a proxy that replays requests.",),
        401, None),
    Entry(
        "E1010", "stale_request",
        "The request was refused because its timestamp is outside the hub's window.",
        ("The machine's clock is more than 15 minutes away from the hub's.",),
        ("Synchronise the machine's clock with NTP.",),
        401, "HW-4"),
    Entry(
        "E1011", "not_registered",
        "This machine is not registered with a hub.",
        ("No registration exists in the agent's state directory.",),
        ("Run the 'outpost agent register ...' line printed by 'outpost hub init'.",
         "If the agent uses a non-default state directory, pass the same --state-dir."),
        400, None),
    Entry(
        "E1012", "account_key_invalid",
        "The account key is not valid base64 of 32 bytes.",
        ("The key was truncated or mangled when it was copied.",),
        ("Copy the key again from 'outpost account keys ACCOUNT_ID'.",),
        400, "HW-4"),
    Entry(
        "E1013", "machine_key_corrupt", "The machine key is corrupt.",
        ("The file machine.key in the state directory was truncated or overwritten. The key "
         "never leaves the machine, so the hub cannot send it again.",),
        ("Register this machine again: 'outpost agent register ... --force'.",),
        400, "HW-9"),
    # --- agent daemon and machine (2xxx) ------------------------------------------------
    Entry(
        "E2001", "config_invalid", "The agent configuration file is invalid.",
        ("The YAML does not parse, or a setting has a wrong type or value.",),
        ("Fix the file at the line and column named in the message, then start the agent "
         "again.",),
        400, "ED-2"),
    Entry(
        "E2002", "config_tab", "The configuration file contains a tab in its indentation.",
        ("YAML does not allow tabs for indentation.",),
        ("Replace the tab with spaces at the line and column named in the message.",),
        400, "ED-2"),
    Entry(
        "E2003", "agent_not_running", "The Outpost agent is not running.",
        ("The agent service was stopped, crashed, or was never started on this machine.",),
        ("Start it: 'systemctl start outpost-agent' or 'outpost agent run --state-dir DIR'.",),
        503, "HW-3"),
    Entry(
        "E2004", "hub_unreachable", "The hub could not be reached.",
        ("dns: the hub's host name does not resolve from this machine.",
         "refused: nothing listens at the hub's address and port, or a firewall rejects it.",
         "timeout: a firewall drops the traffic, or the hub is overloaded.",
         "tls: the TLS handshake failed.",
         "proxy: the configured HTTP(S) proxy refused or failed the connection."),
        ("Check the hub URL in the agent's registration and config.",
         "Allow outbound HTTPS to the hub, or set 'proxy:' in the agent config or "
         "HTTPS_PROXY in its environment.",
         "Run 'outpost check' on the machine for a step-by-step diagnosis."),
        503, "ED-4"),
    Entry(
        "E2005", "port_allocated", "Bind for {address} failed: port is already allocated",
        ("Another process already listens on that address and port.",),
        ("Stop the process named in the message, or choose another port with --bind.",),
        409, "ED-5"),
    Entry(
        "E2006", "agent_already_running", "Another agent already runs with this state directory.",
        ("An agent process holds the pidfile in this state directory.",),
        ("Stop it first ('outpost agent status' shows its pid), or use another --state-dir.",),
        409, None),
    # --- hub and API (3xxx) --------------------------------------------------------------
    Entry(
        "E3001", "unauthorized", "The API token is missing or not valid.",
        ("No token was given, it was mistyped, or it was revoked.",),
        ("Pass --token or set OUTPOST_TOKEN; on the hub's machine, --data-dir DIR finds the "
         "admin token itself.",),
        401, None),
    Entry(
        "E3002", "not_found", "Not found.",
        ("The object does not exist in the token's account.",),
        ("List what exists ('outpost machine list', 'outpost account list') and check the "
         "name or id.",),
        404, None),
    Entry(
        "E3003", "invalid_request", "The request is not valid.",
        ("A field is missing or has a wrong type or value.",),
        ("Correct the field named in the details and send the request again.",),
        422, None),
    Entry(
        "E3004", "admin_required", "This action needs the hub's admin token.",
        ("Only the admin token may create and list accounts.",),
        ("Use the admin token printed by 'outpost hub init'.",),
        403, None),
    Entry(
        "E3005", "hub_not_initialised", "The hub data directory is not initialised.",
        ("'outpost hub init' was never run for this directory.",),
        ("Run 'outpost hub init --data-dir DIR' first.",),
        400, None),
    Entry(
        "E3006", "internal_error", "The hub failed while handling the request.",
        ("A bug in the hub, or its database failed in an unexpected way.",),
        ("Look at the hub's log for the request id given in the details, and report it.",),
        500, None),
    Entry(
        "E3007", "database_unavailable", "The hub's database could not be reached.",
        ("The database server is down or restarting, the network to it is cut, or "
         "--database-url names the wrong host, port or file.",
         "refused: nothing accepts connections at the database's address: the server is "
         "down or restarting, or a firewall or proxy on the way refuses.",
         "reset: the connection to the database broke (the server restarted, or a network "
         "device or proxy dropped it).",
         "closed: the database server closed the connection, or it failed (PostgreSQL's "
         "SQLSTATE class 08).",
         "shutdown: the PostgreSQL server is shutting down or starting up (57P01 to 57P03).",
         "busy: the PostgreSQL server has no connection slot left (53300).",
         "timeout: the database did not answer in time: a network that drops packets, or a "
         "server that is stuck.",
         "locked: another process (a backup, a second hub on the same file) held the SQLite "
         "file's write lock for longer than the hub's busy timeout (5 s).",
         "unreadable: the hub cannot open, read or write its SQLite file (permissions, a "
         "missing directory, an I/O error).",
         "full: the disk that holds the SQLite file is full."),
        ("Nothing, if it passes: the hub answers 503 with Retry-After meanwhile, agents and "
         "waiting commands try again, and no running job is failed or run twice for it. If "
         "it lasts, check --database-url and that the database accepts connections "
         "('outpost hub check').",),
        503, None),
    Entry(
        "E3013", "hub_overloaded", "The hub is overloaded: the request waited {waited} s for "
        "a database connection; try again in a few seconds.",
        ("More requests reach this hub process than it serves: every connection of its "
         "pool stayed in use while the request waited (one connection on SQLite, 30 on "
         "PostgreSQL). The database itself answers; the hub's one core is the limit. "
         "/metrics counts these as outpost_database_failures_total{kind=\"pool\"}.",),
        ("Nothing, if it passes: the hub answers 503 with Retry-After, and agents try "
         "again after it. If it lasts, run more hub replicas on PostgreSQL (docs/hub.md, "
         "'Several replicas') or give agents a longer heartbeat interval.",),
        503, None),
    Entry(
        "E3014", "idempotency_key_reused", "The Idempotency-Key was used for another request.",
        ("A key names one request: the same key came before with another body or to "
         "another route (within 24 hours), so the two requests disagree and the hub cannot "
         "tell which one was meant.",),
        ("Send a new key with a new request ('outpost job start' makes one per command); "
         "send a key again only with the very request it was made for.",),
        422, None),
    Entry(
        "E3015", "idempotency_key_invalid", "The Idempotency-Key header is not a key.",
        ("The header must hold 1 to 255 printable ASCII characters.",),
        ("Send a random key such as a UUID, or leave the header out.",),
        400, None),
    Entry(
        "E3008", "hub_cli_unconfigured", "No hub to talk to.",
        ("Neither --hub/--token nor OUTPOST_HUB/OUTPOST_TOKEN nor --data-dir was given, and "
         "no profile is current (or the one picked has no hub).",),
        ("Start one here with 'outpost up' (it makes its profile current), pick a profile "
         "with 'outpost profile use NAME' ('outpost profile list' shows them), pass "
         "--data-dir DIR on the hub's machine, or --hub URL --token T --ca-fingerprint F "
         "(or the OUTPOST_* variables) elsewhere.",),
        400, None),
    Entry(
        "E3009", "conflict", "The request conflicts with what exists.",
        ("An object of that name already exists.",),
        ("Choose another name, or remove the existing object first.",),
        409, None),
    Entry(
        "E3010", "ping_timeout", "The machine did not answer the ping in time.",
        ("The machine's agent is stopped, cannot reach the hub, or is overloaded.",),
        ("Check the machine's status with 'outpost machine list' and, on the machine, "
         "'outpost agent status'; start the agent if it is not running.",),
        504, None),
    Entry(
        "E3011", "body_too_large", "The request body is larger than the hub accepts.",
        ("The body passed its route's limit, declared in Content-Length or counted as it "
         "arrived: by default 64 KiB for a registration, 2 MiB for an operator's write, "
         "1 MiB for an agent's request and 8 MiB for an agent's job reports.",
         "An agent's reports carried more output records in one request than the hub takes "
         "(20,000 by default)."),
        ("Send less in one request: split a batch of jobs, or put large data where the "
         "runbook can fetch it and send its address.",
         "If such bodies are expected, raise the route's limit under body_limits in the "
         "hub's hub.yaml (docs/hub.md) and restart the hub."),
        413, None),
    Entry(
        "E3012", "method_not_allowed", "The method is not allowed on this path.",
        ("The path exists but does not take this method: each path takes only the methods "
         "/openapi.json lists for it.",),
        ("Send one of the methods the answer's Allow header names.",),
        405, None),
)

_ENTRIES += (
    # --- runbooks and jobs (4xxx) ----------------------------------------------------------
    Entry(
        "E4001", "runbook_type_unknown", "The runbook's type could not be told.",
        ("The file has no known extension (.sh, .bash, .py, .ps1) and no shebang line.",),
        ("Pass --type bash, sh, python or pwsh.",),
        422, None),
    Entry(
        "E4002", "param_spec_invalid", "A parameter declaration is not valid.",
        ("A --param declaration is not NAME:TYPE[=DEFAULT], names an unknown type, or its "
         "default does not fit its type.",),
        ("Declare parameters as NAME:TYPE[=DEFAULT] with TYPE string, int, bool or json.",),
        422, None),
    Entry(
        "E4003", "param_invalid", "A job parameter is not valid.",
        ("A value does not fit the parameter's declared type, or the runbook has no "
         "parameter of that name.",),
        ("Check 'outpost runbook show NAME' for the parameters and their types.",),
        422, None),
    Entry(
        "E4004", "param_missing", "A required job parameter is missing.",
        ("The runbook declares the parameter without a default, and the job did not give it.",),
        ("Pass it with --param NAME=VALUE.",),
        422, None),
    Entry(
        "E4005", "runbook_too_large", "The runbook is larger than the hub accepts.",
        ("Runbook files are limited to 1 MiB.",),
        ("Keep data out of the runbook: fetch it at run time, or pass it as a parameter.",),
        413, None),
    Entry(
        "E4006", "interpreter_missing", "The runbook's interpreter is not installed.",
        ("The runbook's type needs a program (pwsh, bash, sh, python3) that this machine "
         "does not have.",),
        ("Install the interpreter on the machines of the group, or publish the runbook "
         "with another --type.",),
        422, None),
    Entry(
        "E4007", "run_as_unknown", "The group's run-as user does not exist on this machine.",
        ("The group names a run-as user ('outpost group set GROUP --run-as USER') that was "
         "never created on this machine, or was removed.",),
        ("Create the user on the machine (for example 'useradd --system USER'), or change "
         "the group's user with 'outpost group set GROUP --run-as USER'.",
         "Clear it with 'outpost group set GROUP --no-run-as' to run as the agent's user."),
        422, "HW-1a"),
    Entry(
        "E4008", "run_as_unavailable",
        "The agent cannot run runbooks as the group's run-as user.",
        ("Switching to another user needs root, and the agent does not run as root.",),
        ("Run the agent as root (the shipped systemd unit does), or clear the group's "
         "run-as user with 'outpost group set GROUP --no-run-as'.",),
        422, "HW-1a"),
    Entry(
        "E4009", "job_state_conflict", "The job is not in a state that allows this action.",
        ("stop, suspend and resume each apply to some states only: a job that has ended "
         "cannot be stopped, and only a Suspended job can be resumed.",),
        ("See the job's state with 'outpost job show ID'.",),
        409, None),
    # Job outcomes, not HTTP answers: here so that 'outpost explain' finds what a job's
    # status says (the status is the one HTTP-like number: 409, a state the job is in).
    Entry(
        "E4010", "activation_failed", ACTIVATE_FAILED_TEXT,
        ("The job's sandbox or the agent running it died (killed, out of memory, the "
         "machine restarted), or the agent stopped renewing the job's lease (it lost the "
         "hub or was stuck), three times in a row, so the job was Suspended.",),
        ("See each attempt's machine and reason with 'outpost job show ID' (exit code, "
         "signal or lease expiry), fix that machine ('outpost check' on it), then "
         "'outpost job resume ID'.",),
        409, "HW-1"),
    Entry(
        "E4011", "runbook_failed", "The runbook exited with a non-zero exit code.",
        ("A command in the runbook failed, or the runbook called exit with a non-zero "
         "code; the job is Failed and is not retried.",
         "Exit code 255 (4294967295 where it is shown as an unsigned 32-bit number) is -1: "
         "often the interpreter or the run-as account could not start the runbook."),
        ("Read the job's Error stream: 'outpost job output ID --stream Error'.",
         "For a run-as account, check it exists on the machine ('outpost group list')."),
        409, "HW-1a"),
    Entry(
        "E4012", "job_users_unavailable",
        "The agent cannot make or use its unprivileged job users.",
        ("An agent running as root runs runbooks as the users outpost-job1 to outpost-jobN "
         "(one per job slot) and makes them with useradd when they are missing; useradd "
         "is not installed, failed, or a user of that name has uid 0.",),
        ("Make the users yourself ('useradd --system --user-group --no-create-home --shell "
         "/usr/sbin/nologin outpost-job1', and so on up to max_concurrent_jobs), or set "
         "'job_users: false' in the agent's config to run runbooks as root (not advised).",),
        500, None),
    Entry(
        "E4013", "job_out_of_memory", "The job was killed for going over its memory limit.",
        ("The runbook's processes together used more memory than the job's limit (the "
         "group's --memory-mb, else the agent's job_memory_mb, 512 MiB by default); the "
         "kernel killed one of them. The job is Failed and is not retried.",),
        ("Raise the group's limit ('outpost group set GROUP --memory-mb 2048') or make the "
         "runbook use less memory.",),
        409, None),
)

CERTIFICATE_MISSING_TEXT = "No certificate was found in the certificate store with thumbprint"

_ENTRIES += (
    # --- assets and the job identity (5xxx) ------------------------------------------------
    Entry(
        "E5001", "certificate_not_found", CERTIFICATE_MISSING_TEXT + " {thumbprint}",
        ("The job asked for a certificate asset that this account does not hold: the "
         "thumbprint or name is mistyped, or the certificate was never imported or was "
         "removed.",
         "The certificate was imported into another account than the job's."),
        ("Import it into the job's account: 'outpost asset certificate import NAME FILE', "
         "then check the thumbprint with 'outpost asset list'.",),
        404, "HW-2"),
    Entry(
        "E5002", "job_token_invalid",
        "The job token is not valid, or its job is no longer running.",
        ("The job ended (Completed, Failed or stopped); its token ended with it.",
         "The token was copied out of its job and used elsewhere, or altered.",
         "The job was activated again, which gives it a new token."),
        ("Call the hub from inside the running job, through the runbook helper, which reads "
         "the job's current token.",),
        401, "HW-2"),
    Entry(
        "E5003", "certificate_invalid", "The certificate could not be read.",
        ("The file is neither a PEM certificate nor a PFX (PKCS#12) file, or it is damaged.",
         "The PEM file holds a private key that does not belong to its certificate."),
        ("Import a PEM file (the certificate, and optionally its unencrypted private key) or "
         "a PFX file with its password (--password-stdin).",),
        422, "HW-2"),
    Entry(
        "E5004", "certificate_password",
        "The certificate file could not be opened with the password given.",
        ("The PFX file or the PEM private key is protected by a password, and the password "
         "is wrong or was not given.",
         "The PFX file is damaged."),
        ("Pass the file's password on standard input with --password-stdin, for example "
         "'outpost asset certificate import NAME FILE --password-stdin < password.txt'.",),
        422, "HW-2"),
    Entry(
        "E5005", "asset_too_large", "The asset is larger than the hub accepts.",
        ("Variables and credentials are limited to 64 KiB, certificate files to 1 MiB.",),
        ("Keep large data out of assets: store it where the runbook can fetch it, and keep "
         "its address or key in an asset.",),
        413, None),
)

_ENTRIES += (
    # --- schedules and webhooks (6xxx) -----------------------------------------------------
    Entry(
        "E6001", "cron_invalid", "The cron expression is not valid.",
        ("The expression does not have 5 fields (minute hour day month weekday) or 6 with "
         "seconds first, a field is out of range, or it never matches a date (31 February).",
         "It uses random or hashed fields (R, H), which a schedule does not take."),
        ("Write it as 'MINUTE HOUR DAY MONTH WEEKDAY' (for example '30 2 * * *'), or "
         "'SECOND MINUTE HOUR DAY MONTH WEEKDAY'; to stagger runs, use --spread.",),
        422, None),
    Entry(
        "E6002", "timezone_unknown", "The time zone is not known.",
        ("The name is not an IANA time zone (such as Europe/Berlin or UTC), or the hub's "
         "machine lacks the time zone database.",),
        ("Give an IANA time zone name with --timezone, for example Europe/Berlin, "
         "America/New_York or UTC.",),
        422, None),
    Entry(
        "E6004", "expiry_invalid", "The expiry is not a valid future date.",
        ("--expires is not an ISO 8601 date or date and time (2030-01-31, "
         "2030-01-31T18:00:00+01:00), or it is already past.",),
        ("Give a future date or date and time in ISO 8601 form; without a zone it is UTC.",),
        422, None),
    Entry(
        "E6005", "webhook_param_missing",
        "The runbook does not take the request body of a webhook.",
        ("A webhook passes the body of each request as the runbook parameter 'body', and "
         "the runbook does not declare it as a string or json parameter.",),
        ("Publish the runbook again with --param body:string (or body:json, or with a "
         "default such as body:string=), then create the webhook.",),
        422, None),
    Entry(
        "E6006", "webhook_not_found", "No webhook answers at this address.",
        ("The webhook's address is mistyped or incomplete, the webhook was removed, or it "
         "has expired.",),
        ("Ask the operator for the webhook's current address ('outpost webhook list' shows "
         "the webhooks and when they expire; a new one is made with "
         "'outpost webhook create').",),
        404, None),
    Entry(
        "E6007", "webhook_body_too_large", "The request body is larger than a webhook accepts.",
        ("A webhook's request body is limited to 64 KiB.",),
        ("Send less: put large data where the runbook can fetch it, and send its address.",),
        413, None),
)

_ENTRIES += (
    # --- diagnosis: outpost check and outpost hub check (7001-7049) ----------------------
    Entry(
        "E7001", "registration_corrupt", "The registration file is corrupt.",
        ("registration.json in the state directory failed its checksum or does not parse: "
         "it was truncated by a full disk or a crash, or edited by hand.",),
        ("Register this machine again: 'outpost agent register ... --force'.",),
        400, "HW-9"),
    Entry(
        "E7002", "cache_file_corrupt", "A file in the agent's state cache is corrupt.",
        ("A checksummed file in the state directory failed its checksum or does not parse.",),
        ("Run 'outpost agent reset-cache' (or stop the agent, delete the file named in the "
         "message, and start the agent): the agent fetches it again from the hub.",),
        400, "HW-9"),
    Entry(
        "E7003", "heartbeat_missing", "The hub has not acknowledged a heartbeat recently.",
        ("The agent cannot reach the hub, the hub refuses its heartbeats, or the agent is "
         "stuck.",),
        ("Look at the agent's last error ('outpost agent status') and fix what it names; "
         "the checks above this one usually say which.",),
        503, "HW-9"),
    Entry(
        "E7004", "hardware_below_minimum",
        "The machine is below the minimum hardware (2 CPUs, 4 GB of memory).",
        ("The machine, or the CPU set and memory limit it is given, is smaller than the "
         "agent's documented minimum; jobs may run slowly and time out.",),
        ("Give the machine (or its container) at least 2 CPUs and 4 GB of memory, or lower "
         "'max_concurrent_jobs' in the agent config.",),
        400, "HW-1b"),
    Entry(
        "E7005", "machine_under_pressure", "The machine is under CPU or memory pressure.",
        ("CPU or memory use stays above the agent's threshold, so the agent takes no new "
         "job until it falls.",),
        ("Find what uses the CPU or memory (top, ps) and stop or move it; or raise "
         "'max_cpu_percent' / 'max_memory_percent' in the agent config.",),
        503, "HW-1b"),
    Entry(
        "E7006", "disk_low", "The disk is almost full.",
        ("Little free space is left on the file system that holds the directory named in "
         "the message.",),
        ("Free space on that file system, or move the directory to a larger one.",),
        507, None),
    Entry(
        "E7007", "migrations_pending", "The database schema is not the one this hub expects.",
        ("The database was created by an older hub and not migrated yet, or by a newer "
         "hub than this one.",),
        ("Start the hub ('outpost hub run'): it migrates the database at start. A database "
         "migrated by a newer hub needs that hub version.",),
        503, None),
    Entry(
        "E7008", "hub_certificate_expiring", "The hub's TLS certificate expires soon.",
        ("The certificate's validity ends within 30 days.",),
        ("Issue a new certificate before it expires (move server.pem and server.key aside "
         "and run 'outpost hub init' on a copy, or pass --tls-cert/--tls-key to 'hub run'), "
         "then restart the hub.",),
        400, None),
    Entry(
        "E7009", "hub_certificate_invalid", "The hub's TLS certificate is not valid.",
        ("The certificate has expired, is not valid yet, does not match its key, or was not "
         "issued by the hub's CA.",),
        ("Issue a new certificate from the hub's CA, or pass the right --tls-cert/--tls-key "
         "to 'outpost hub run'.",),
        400, None),
    Entry(
        "E7010", "sandbox_weak", "Runbooks here run with less isolation than the sandbox "
        "gives.",
        ("The agent runs as root and runs runbooks as root ('job_users: false' in its "
         "config), so a runbook can read the machine key, the agent's state and, where the "
         "hub runs on the same machine, its keys.",
         "No cgroup hierarchy can be written (an agent that is not root, a container that "
         "does not delegate one), so jobs get rlimits: no CPU limit, and processes a job "
         "detaches outlive it."),
        ("Remove 'job_users: false' from the agent's config and restart it.",
         "Run the agent as root with a writable /sys/fs/cgroup (for systemd, the shipped "
         "unit, or Delegate=yes)."),
        409, None),
)

_ENTRIES += (
    # --- the agent's logs and support bundle (E7050-E7069) --------------------------------
    Entry(
        "E7050", "log_level_invalid", "The log level is not known.",
        ("OUTPOST_LOG, the config's log_level or --level is not one of debug, info, "
         "warning, error.",),
        ("Use one of debug, info, warning, error; for example OUTPOST_LOG=debug, then "
         "restart the agent.",),
        400, "ED-1"),
    Entry(
        "E7051", "duration_invalid", "The duration is not valid.",
        ("A duration (--timeout, --spread, --since, 'machine ping --timeout', the API's "
         "timeout and spread fields, the config's job_log_retention) is not a number of "
         "seconds or a value like 90s, 250ms, 5m, 10min, 2h, 1d or 1h30m.",
         "The duration is outside the range the setting allows: a job's timeout and a "
         "schedule's spread are at most 7 days."),
        ("Give a duration like 10m, 2h or 1d, for example 'outpost job start ... --timeout "
         "5m'; the message names the setting and the range.",),
        422, "EX-7", ("E6003",)),
    Entry(
        "E7052", "job_log_not_found", "No log of this job is kept on this machine.",
        ("Another machine of the group ran the job.",
         "The job ended longer ago than the agent's job_log_retention (7 days by default), "
         "so its log was removed.",
         "The agent keeps its state in another directory than the one given."),
        ("See the job's output on the hub: 'outpost job output ID'; 'outpost job show ID' "
         "names the machine of every attempt.",
         "List the job logs this machine keeps: 'outpost agent logs --jobs'."),
        404, "EX-9"),
    Entry(
        "E7053", "bundle_failed", "The support bundle could not be written.",
        ("The output file's directory does not exist or is not writable, or the disk is "
         "full.",),
        ("Write it elsewhere with -o FILE (a directory you can write to, with free space).",),
        500, "EX-9"),
    # --- the agent the hub hands out, and the hub's own TLS certificate (E8020-E8029) -----
    Entry(
        "E8020", "agent_wheel_unavailable", "The hub cannot build the agent's wheel.",
        ("The hub runs from a source tree on sys.path, without the outpost-fleet "
         "distribution installed, so it has no metadata to build the wheel from.",
         "The installed package's files are incomplete."),
        ("Install the hub with pip ('pip install outpost-fleet[hub]', or 'pip install -e "
         ".[hub]' in a checkout) and restart it.",),
        503, None),
    Entry(
        "E8021", "tls_files_unreadable", "The TLS certificate or key cannot be read.",
        ("The file does not exist or this user may not read it.",
         "The file is not PEM: a DER file, a PKCS#12 bundle, or a key with a passphrase."),
        ("Pass PEM files: the certificate chain (server first, then its issuers up to the "
         "root CA) with --tls-cert, its unencrypted private key with --tls-key.",),
        400, None),
    Entry(
        "E8022", "tls_key_mismatch", "The TLS private key does not belong to the certificate.",
        ("--tls-key names the key of another certificate (an older one, or another host's).",),
        ("Pass the key the certificate was issued for (its public key is the certificate's).",),
        400, None),
    Entry(
        "E8023", "tls_hostname_not_covered",
        "The TLS certificate does not cover the hub's host names.",
        ("The certificate's subject alternative names do not include every --hostname, or "
         "the host of the hub's URL; agents would refuse the connection.",),
        ("Pass the host names the certificate covers with --hostname, or have a certificate "
         "issued that names them.",),
        400, None),
    Entry(
        "E8024", "tls_chain_incomplete",
        "The TLS certificate file does not end with the CA that agents should pin.",
        ("The file holds the server certificate alone, or stops at an intermediate CA: "
         "agents pin the root CA at the end of the chain, so it must be there.",
         "A certificate in the file was not issued by the one after it (the order is wrong "
         "or a certificate is missing)."),
        ("Append the issuing CA certificates, ending with the root CA, to the file (server "
         "certificate first): cat server.pem intermediate.pem root.pem > chain.pem.",),
        400, None),
)

_ENTRIES += (
    # --- the CLI's profiles, fingerprints and 'outpost up' (E8001-E8019) ----------------
    Entry(
        "E8001", "fingerprint_malformed",
        "The CA fingerprint {value} is malformed: {problem}.",
        ("The value given as --ca-fingerprint (or OUTPOST_CA_FINGERPRINT, or in a profile) "
         "is not a SHA-256 fingerprint: 64 hexadecimal digits, with or without colons and "
         "an optional 'sha256=' or 'SHA256:' prefix. It was mistyped or cut short when "
         "copied.",),
        ("Copy the fingerprint again from the output of 'outpost hub init' (or 'outpost "
         "profile show' on a machine that has the hub's profile); 'AB:CD:...', 'abcd...' and "
         "'sha256=abcd...' are all accepted.",),
        400, None),
    Entry(
        "E8002", "profile_unknown", "No profile named '{name}'.",
        ("The name given with --profile or OUTPOST_PROFILE, or to 'outpost profile "
         "use/show/remove', is not in the profiles file: mistyped, or removed.",),
        ("List the profiles with 'outpost profile list' and pick one of them.",),
        404, None),
    Entry(
        "E8003", "profiles_file_invalid", "The profiles file {path} cannot be read: {problem}.",
        ("The file was edited by hand and is no longer valid YAML of the expected shape, "
         "or it cannot be read by this user.",),
        ("Fix or remove the file; 'outpost up' and 'outpost hub init' write it again.",),
        400, None),
    Entry(
        "E8004", "profile_token_missing", "The token of profile '{name}' is missing.",
        ("The token file the profile refers to was removed or cannot be read.",),
        ("Write the profile again: 'outpost up' or 'outpost hub init' where the hub is, or "
         "'outpost profile add NAME ...' elsewhere; or pass --token.",),
        400, None),
    Entry(
        "E8005", "outpost_already_up", "Outpost is already up in {data_dir}.",
        ("Another 'outpost up' (or a 'hub run' and an 'agent run' on this directory) already "
         "runs the hub and the agent of this directory.",),
        ("Use the running one: its profile is now current, so 'outpost machine list' talks "
         "to it; stop it first (Ctrl-C where it runs, or kill the pids shown) to start again.",
         "Pass another --data-dir to start a second, separate Outpost."),
        409, None),
    Entry(
        "E8006", "profile_name_invalid", "The profile name '{name}' is not valid.",
        ("A profile name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
         "or a digit.",),
        ("Choose a name such as 'local', 'prod' or 'hub-eu-1'.",),
        400, None),
)

_ENTRIES += (
    # --- consistent commands: job id prefixes, runbook removal, parameters (E8040-E8059) --
    Entry(
        "E8040", "job_id_ambiguous", "The job id prefix '{prefix}' matches several jobs.",
        ("A job may be named by the start of its id, as git names commits, and more than "
         "one job of the account begins with what was given.",),
        ("Give more characters of the id; 'outpost job list' shows the jobs, "
         "'--json' their full ids.",),
        409, None),
    Entry(
        "E8041", "runbook_in_use", "The runbook '{name}' is in use and was not removed.",
        ("A schedule or a webhook starts this runbook, or a job of it has not ended "
         "(queued, running or suspended); removing it would make them fail.",),
        ("Remove the schedules and webhooks the message names ('outpost schedule remove "
         "NAME', 'outpost webhook remove NAME') and stop or wait for its jobs, then remove "
         "the runbook.",),
        409, None),
    Entry(
        "E8042", "param_duplicate", "The parameter '{name}' is given more than once.",
        ("--param NAME=VALUE names the same parameter twice, so it is not clear which value "
         "is meant.",),
        ("Give each parameter once.",),
        422, None),
    Entry(
        "E8043", "value_empty", "The value read from standard input is empty.",
        ("Standard input was empty (a pipe from a command that printed nothing, or "
         "'< /dev/null'), so the variable would be stored empty by mistake.",),
        ("Check the command that feeds standard input; to store an empty value on "
         "purpose, pass --allow-empty.",),
        422, None),
)

_ENTRIES += (
    # --- a job on every machine of a group, with rate control (E8120-E8139) --------------
    Entry(
        "E8120", "fanout_options_invalid", "The options of 'job start --all' do not fit "
        "together.",
        ("--all runs the job on every machine of a group, so it needs --group.",
         "--max-concurrency and --max-errors apply to a job on every machine (--all) only.",
         "--count queues several jobs for any machine of a group; --all queues one for each "
         "machine: the two do not combine."),
        ("Give --group G with --all, and --max-concurrency/--max-errors only with --all "
         "(for example 'outpost job start R --group web --all --max-concurrency 10%').",),
        422, None),
    Entry(
        "E8121", "fanout_limit_invalid", "The value '{value}' of {option} is not valid.",
        ("--max-concurrency takes a number of machines of at least 1 (N) or a percentage "
         "of the group's machines from 1% to 100% (P%).",
         "--max-errors takes a number of failed children that may pass (N, 0 or more: 0 "
         "stops dispatching at the first failure) or a percentage of the children from 1% "
         "to 100% (P%)."),
        ("Give a whole number or a whole percentage, for example '--max-concurrency 10' or "
         "'--max-concurrency 25%', '--max-errors 0' or '--max-errors 5%'.",),
        422, None),
    Entry(
        "E8122", "fanout_group_empty", "No machine is registered in group '{group}'.",
        ("A job on every machine of a group was asked for a group no machine has joined "
         "(a misspelt group, or every machine of it removed).",),
        ("See the groups and their machines with 'outpost group list' and 'outpost machine "
         "list'; register a machine with 'outpost agent register ... --group G'.",),
        422, None),
    Entry(
        "E8123", "fanout_no_machine_ready", "No machine of group '{group}' can take the "
        "job now.",
        ("Every machine of the group is Stopped (its agent said it was stopping), "
         "Unresponsive or Disconnected, so no child job would start.",),
        ("See why with 'outpost machine list'; start the agents ('systemctl start "
         "outpost-agent'), wait for a heartbeat, then start the job again.",),
        409, None),
    Entry(
        "E8124", "fanout_control_unsupported", "A job on every machine of a group can be "
        "stopped, not suspended or resumed.",
        ("'job suspend' and 'job resume' act on one job on one machine; the job named is "
         "the parent of one child job per machine.",),
        ("Suspend or resume a child by its id (shown by 'outpost job show PARENT'), or stop "
         "the whole run with 'outpost job stop PARENT'.",),
        409, None),
    # --- schedules of extension operations (E8125-E8134) ---------------------------------
    Entry(
        "E8125", "schedule_kind_invalid", "Give a schedule exactly one of a runbook and an "
        "extension's operation.",
        ("A schedule starts a runbook (--runbook, a job on one machine of the group) or "
         "asks an extension's operation (--extension with --operation, on every machine of "
         "the group or on one machine); both were given, or neither.",
         "--operation was given without --extension, or --extension without --operation."),
        ("Give --runbook R, or --extension NAME --operation OP (for example 'outpost "
         "schedule create nightly --extension backup --operation snapshot --group web "
         "--cron \"0 2 * * *\" --spread 2h').",),
        422, "EX-7"),
    Entry(
        "E8126", "schedule_target_invalid", "Give a schedule exactly one of a group and a "
        "machine.",
        ("An extension operation's schedule runs on every machine of a group (--group) or "
         "on one machine (--machine); both were given, or neither.",
         "A runbook's schedule starts its job on one machine of a group: it takes --group, "
         "not --machine."),
        ("Give --group G, or --machine M with --extension.",),
        422, "EX-7"),
    Entry(
        "E8127", "schedule_operation_unknown", "No published version of extension {name} "
        "has an operation '{operation}'.",
        ("The operation's name is mistyped, or it is not among the operations of any "
         "published version's manifest; the message lists the operations there are.",),
        ("See the extension's operations with 'outpost extension versions NAME', and give "
         "one of them with --operation.",),
        404, "EX-7"),
    # --- a child of a job on every machine of a group (E8128-E8130) ----------------------
    Entry(
        "E8128", "fanout_child_held", "Job '{job}' is held back by the rate control of its "
        "parent job '{parent}'; only that rate control starts it.",
        ("The child job is New: it waits for a free slot of its parent's --max-concurrency. "
         "Suspending it, then resuming it, would queue it outside that limit, so 'job "
         "suspend' and 'job resume' do not apply to it.",),
        ("Let the parent release it (see 'outpost job show PARENT'), stop it with 'outpost "
         "job stop CHILD', or stop the whole run with 'outpost job stop PARENT'.",),
        409, None),
    Entry(
        "E8129", "fanout_dispatch_halted", "No further child of job '{parent}' starts: "
        "{halted}.",
        ("The child job is Suspended and not on a machine: resuming it would queue it "
         "again, and its parent stopped dispatching (more children failed than "
         "--max-errors lets pass).",),
        ("Stop the child with 'outpost job stop CHILD'; to run the runbook on that machine "
         "again, start a new job once the cause of the failures is fixed.",),
        409, None),
    # --- API tokens and hub replicas (E8100-E8119) ----------------------------------------
    Entry(
        "E8100", "token_admin_forbidden", "Only an admin token can create an admin token.",
        ("'outpost token create --admin' (or POST /v1/tokens with \"admin\": true) was sent "
         "with a token that is not the hub's admin token.",),
        ("Create a token without --admin, or ask the hub's administrator.",),
        403, None),
    Entry(
        "E8101", "token_last_admin", "The token '{name}' is the last admin token and was "
        "not revoked.",
        ("Revoking it would leave nobody able to administer the hub.",),
        ("Create another admin token first ('outpost token create NAME --admin'), use it, "
         "then revoke this one.",),
        409, None),
    Entry(
        "E8102", "token_last", "The token '{name}' is the account's last token and was not "
        "revoked.",
        ("Revoking it would leave the account without any way to call the hub.",),
        ("Create another token first ('outpost token create NAME'), then revoke this one.",),
        409, None),
    Entry(
        "E8103", "token_name_taken", "A token named '{name}' already exists in this account.",
        ("Token names are unique within an account, so 'outpost token revoke NAME' means "
         "one token.",),
        ("Choose another name; 'outpost token list' shows the names in use.",),
        409, None),
    Entry(
        "E8104", "token_name_invalid", "The token name '{name}' is not valid.",
        ("A token name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
         "or a digit.",),
        ("Choose a name such as 'ci', 'deploy-bot' or 'alice.laptop'.",),
        422, None),
    # --- the agent's work items (E8150-E8159) ------------------------------------------
    Entry(
        "E8150", "work_kind_unknown", "This agent does not handle work of kind '{kind}'.",
        ("The hub handed this machine a kind of work item that its agent has no handler "
         "for: the agent is older than the hub, or the extension or module that handles "
         "that kind is not installed on the machine.",),
        ("Upgrade the agent on the machine (run the install line of 'outpost machine "
         "install-line' again), or install what handles that kind of work there.",),
        422, None),
    Entry(
        "E8151", "work_payload_invalid",
        "The work item {item} of kind '{kind}' is malformed: {problem}.",
        ("The item's payload does not have the shape the agent expects for its kind: the "
         "hub and the agent are of versions that disagree on it.",),
        ("Run the same version of Outpost on the hub and the agent ('outpost --version' "
         "on both); upgrade the older one.",),
        422, None),
    Entry(
        "E8152", "work_handler_failed",
        "The agent's handler for work of kind '{kind}' failed: {problem}.",
        ("A bug in the handler of that kind (an extension's or a module's, or the agent's "
         "own): it raised an error instead of answering. The agent went on with other "
         "work.",),
        ("Look at the agent's log on the machine ('outpost agent logs') for the traceback, "
         "and report it to the handler's authors.",),
        500, None),
)

_ENTRIES += (
    # --- extension packages (E9000-E9029) -------------------------------------------------
    Entry(
        "E9000", "ext_package_invalid", "The extension package is not valid: {problem}.",
        ("The file is not a gzip-compressed tar archive, or its manifest "
         "(outpost-extension.json at the archive's root) is missing or does not validate, "
         "or a file it names is not in the archive, or a member would unpack outside the "
         "package (an absolute path, '..', a link, a device).",),
        ("Fix what the message names and build the archive again (for example 'tar -czf "
         "ext-1.0.0.tar.gz -C DIR .'); 'outpost extension publish' checks it the same way "
         "the agent does.",),
        422, "EX-8"),
    Entry(
        "E9001", "ext_package_digest", "The extension package {name} {version} does not "
        "match its digest: expected SHA-256 {expected}, got {actual}.",
        ("The package was changed or cut short between the hub and the machine (a proxy, "
         "a full disk), or the hub's copy is damaged.",),
        ("Publish the package again ('outpost extension publish FILE'); the agent keeps "
         "the version it has and tries again at its next heartbeat.",),
        422, "EX-8"),
    Entry(
        "E9002", "ext_package_too_large", "The extension package is larger than {limit}.",
        ("An extension package is read whole before it is unpacked, so its size is "
         "bounded.",),
        ("Leave large data out of the package: let its install handler fetch or build "
         "it.",),
        413, None),
    # --- extension packages on the hub, and desired state (E9003-E9029) -------------------
    Entry(
        "E9003", "ext_version_exists",
        "Extension {name} {version} is already published with other content.",
        ("A published version is immutable: the package sent has the same name and version "
         "as one the account has, but a different SHA-256.",),
        ("Raise the version in outpost-extension.json, build the archive again and publish "
         "that; 'outpost extension versions NAME' lists what is published.",),
        409, None),
    Entry(
        "E9004", "ext_not_found", "No extension '{name}' is published in this account.",
        ("The name is misspelt, or the package was published in another account (each "
         "account has its own extensions).",),
        ("See 'outpost extension list' for the extensions of this account, or publish it "
         "first ('outpost extension publish FILE').",),
        404, None),
    Entry(
        "E9005", "ext_version_not_found", "Extension {name} has no version {version}.",
        ("The version is misspelt or was never published in this account.",),
        ("See 'outpost extension versions NAME', or leave --version out to use the newest "
         "version.",),
        404, None),
    Entry(
        "E9006", "ext_settings_invalid",
        "The {field} of extension {name} {version} do not satisfy its schema: {problem}.",
        ("The settings do not match the manifest's settings_schema (or "
         "protected_settings_schema for protected settings): a field is missing, of the "
         "wrong type or out of range.",),
        ("Correct the field the message names in the settings file and run 'outpost "
         "extension set' again; the schema is in the package's outpost-extension.json.",),
        422, None),
    Entry(
        "E9007", "ext_target_unknown",
        "Cannot set an extension on {kind} '{target}': this account has none by that name.",
        ("A goal names a group or machine this account does not have: no machine has "
         "registered into that group yet, or the machine's name is misspelt.",),
        ("See 'outpost machine list' and 'outpost group list'; register a machine into the "
         "group first, or give an existing one.",),
        404, None),
    Entry(
        "E9008", "ext_goal_not_found", "Extension {name} has no goal for {kind} '{target}'.",
        ("Nothing was set for that extension on that group or machine (a machine may get "
         "it through its group: remove or retry that goal instead).",),
        ("See 'outpost extension show NAME' for the goals that exist.",),
        404, None),
    Entry(
        "E9009", "ext_package_not_assigned",
        "This machine has no goal naming extension {name} {version}.",
        ("An agent asked for a package that none of its machine's goals names: the goal "
         "changed since its last heartbeat, or the package is another account's.",),
        ("Nothing to do on the machine: the agent fetches its goals again at its next "
         "heartbeat and asks for what they name.",),
        404, None),
    Entry(
        "E9010", "ext_settings_file_invalid", "The settings file {path} is not usable: "
        "{problem}.",
        ("The file given to --settings or --protected-settings cannot be read, or is not "
         "a JSON or YAML object (a mapping of names to values).",),
        ("Write the settings as one JSON object (or a YAML mapping) and pass the file "
         "again.",),
        422, None),
    Entry(
        "E9011", "ext_protected_unreadable",
        "The protected settings of extension {name} for {kind} '{target}' cannot be opened.",
        ("The hub's master key changed since they were stored (a restored database with "
         "another data directory), or the row was copied from another goal.",),
        ("Set them again: 'outpost extension set NAME --{kind} {target} "
         "--protected-settings FILE'.",),
        409, None),
)

_ENTRIES += (
    # --- extensions on the machine (E9030-E9059) ------------------------------------------
    Entry(
        "E9030", "ext_handler_hung", "The {handler} handler of extension {name} hung and was "
        "killed.",
        ("The handler command ran past its timeout_seconds (the manifest's), or exited "
         "leaving its status file at 'transitioning' (or without one) until then. The agent "
         "killed its whole process group and whatever else ran in the extension's control "
         "group; the extension is Failed with the step that hung.",),
        ("Read the extension's log on the machine (<state>/logs/extensions/NAME.log) to see "
         "where it stopped; fix the handler or raise its timeout_seconds, publish a new "
         "version, or run 'outpost extension retry' once the cause is gone.",
         "Uninstall works in this state: 'outpost extension remove' ends it and cleans up."),
        409, "EX-5"),
    Entry(
        "E9031", "ext_handler_failed", "The {handler} handler of extension {name} failed.",
        ("The handler exited with a non-zero code, or wrote 'error' in its status file "
         "(its own code and message are shown), or could not be started.",),
        ("Read the extension's log on the machine (<state>/logs/extensions/NAME.log); fix "
         "the cause and run 'outpost extension retry', or publish a fixed version.",),
        409, "EX-5"),
    Entry(
        "E9032", "ext_status_malformed", "The status file {path} of extension {name} is "
        "malformed.",
        ("A handler writes $OUTPOST_EXT_STATUS_DIR/<seq>.status as JSON: {\"status\": "
         "\"transitioning\"|\"success\"|\"warning\"|\"error\", \"code\": N, "
         "\"message\": \"...\"}; this one is not JSON, or a field is wrong (the message "
         "names the file and the field).",),
        ("Fix the handler so that it writes the status file as described in "
         "docs/extensions.md, publish a new version, and set it.",),
        409, "EX-5"),
    Entry(
        "E9033", "ext_update_rolled_back", "The update of extension {name} failed and was "
        "rolled back.",
        ("A step of the update (disable the old version, the new one's update, uninstall "
         "the old, install or enable the new) failed, so the agent undid it and enabled "
         "the last version that was Ready again. The failed version is not tried again on "
         "this machine until the operator asks.",),
        ("Read why in the message and the extension's log, publish a fixed version, or run "
         "'outpost extension retry NAME --machine M' to try the same one again.",),
        409, "EX-8"),
    Entry(
        "E9034", "ext_run_as_unknown", "The user '{user}' that extension handlers should run "
        "as does not exist on this machine.",
        ("The extension's goal names a user ('extension set --run-as') that this machine "
         "does not have.",),
        ("Create the user on the machine, or set the extension without --run-as so that "
         "its handlers run as the agent's unprivileged user outpost-ext.",),
        409, None),
    Entry(
        "E9035", "ext_user_unavailable", "The agent cannot use the extension user "
        "'{user}'.",
        ("A root agent runs extension handlers as the system user outpost-ext, made with "
         "useradd the first time; useradd is missing or failed, or the user has uid 0.",),
        ("Install useradd (the passwd package) or create the user by hand ('useradd "
         "--system --user-group --no-create-home --shell /usr/sbin/nologin outpost-ext').",),
        409, None),
    Entry(
        "E9036", "ext_protected_not_for_machine", "The protected settings of an extension cannot "
        "be read on this machine.",
        ("Protected settings are sealed to the machine's key: these were sealed to another "
         "machine's key (the machine was registered again since), or damaged.",),
        ("Set the extension's protected settings again ('outpost extension set NAME "
         "--protected-settings FILE'); the hub seals them to the machine's current key.",),
        409, None),
    Entry(
        "E9037", "ext_download_failed", "The package of extension {name} {version} could not "
        "be downloaded.",
        ("The hub could not be reached, or refused the download (the package or version "
         "was removed). The agent keeps what is installed and tries again later.",),
        ("Check the machine's path to the hub with 'outpost check'; make sure the version "
         "is published ('outpost extension list').",),
        502, None),
    Entry(
        "E9038", "ext_agent_too_old", "Extension {name} {version} needs a newer agent.",
        ("The package's manifest sets min_agent_version above this agent's version.",),
        ("Upgrade the agent on the machine (run the install line of 'outpost machine "
         "install-line' again), then 'outpost extension retry'.",),
        409, "EX-4"),
    Entry(
        "E9039", "ext_tree_unsafe", "The directory {path} for extensions is not safe to use.",
        ("A root agent keeps extensions beside its state directory (STATE-extensions) so "
         "that the extension user can reach them; that directory exists but is not root's, "
         "or others may write it.",),
        ("Remove the directory (or give it to root with mode 0711) and restart the agent.",),
        409, None),
    Entry(
        "E9040", "ext_rollback_failed", "The update of extension {name} failed, and so did "
        "its rollback.",
        ("After a failed update the agent installs (if it had been uninstalled) and enables "
         "the last Ready version again; that failed too, so the extension is Failed with "
         "step 'rollback'.",),
        ("Read the extension's log on the machine; remove the extension ('outpost extension "
         "remove', which works in every state) and set a version that works.",),
        409, "EX-8"),
)

_ENTRIES += (
    # --- extension operations (E9080-E9099) ----------------------------------------------
    Entry(
        "E9080", "ext_op_agent_unresponsive", "The agent is not ready / unresponsive: "
        "machine {machine} is {status}.",
        ("The machine's agent missed its heartbeats (it was killed, the machine is down, or "
         "its path to the hub is broken), or it never sent one; an operation would only wait "
         "for an agent that does not answer.",),
        ("Start the agent on the machine ('systemctl start outpost-agent') or fix its path "
         "to the hub ('outpost check' there), wait for 'outpost machine list' to show it "
         "Healthy, then ask for the operation again.",),
        409, "EX-3", aliases=("151099",)),
    Entry(
        "E9081", "ext_op_machine_stopped", "The agent of machine {machine} is stopped.",
        ("The machine's agent told the hub it was stopping (a service stop, a shutdown); "
         "nothing would start the operation.",),
        ("Start the agent on the machine again; it shows Healthy from its next heartbeat. "
         "Then ask for the operation again.",),
        409, "EX-10"),
    Entry(
        "E9082", "ext_op_agent_too_old", "The Linux agent is out of date: extension {name} "
        "{version} needs agent {needed} or newer.",
        ("The extension's manifest sets min_agent_version above the version of the agent "
         "on the machine.",),
        ("Upgrade the agent on the machine (run the install line of 'outpost machine "
         "install-line' there again), then ask for the operation again.",),
        409, "EX-4", aliases=("151095",)),
    Entry(
        "E9083", "ext_op_previous_overdue", "The previous extension operation is taking "
        "longer than expected.",
        ("An operation of the same extension on the same machine is still running past the "
         "expected_seconds its manifest gives; operations of one extension run one at a "
         "time, and a new one would wait behind it for an unknown time.",),
        ("Look at the running operation ('outpost extension operation ID') and at the "
         "extension's log on the machine; wait for it to end, or remove and set the "
         "extension again to stop it.",),
        409, "EX-2", aliases=("150066",)),
    Entry(
        "E9084", "ext_op_start_timeout", "Job execution timed out while tracking for "
        "extension operation to be started.",
        ("No agent started the operation within its start_timeout_seconds: the agent "
         "stopped or lost its path to the hub after it was asked, or it waited for the "
         "machine's load or for the extension to be installed again for too long.",),
        ("Check the machine with 'outpost machine show' and its agent with 'outpost agent "
         "status'; ask for the operation again once it is Healthy.",),
        409, "EX-1", aliases=("151076",)),
    Entry(
        "E9085", "ext_op_no_goal", "Extension {name} is not set for machine {machine}.",
        ("Operations run only on machines the extension is set for (by the machine's own "
         "goal or its group's).",),
        ("Set it with 'outpost extension set NAME --machine M' (or --group), then ask "
         "again.",),
        404, None),
    Entry(
        "E9086", "ext_op_unknown_operation", "Extension {name} {version} has no operation "
        "'{operation}'.",
        ("The operation is not among the operations of the manifest of the version set for "
         "the machine.",),
        ("See the extension's operations with 'outpost extension show NAME'.",),
        404, None),
    Entry(
        "E9087", "ext_op_not_found", "No extension operation '{op_id}'.",
        ("The id is mistyped, or the operation belongs to another account.",),
        ("List operations with 'outpost extension operations'.",),
        404, None),
    Entry(
        "E9088", "ext_op_not_ready", "Extension {name} is not Ready on this machine.",
        ("The agent runs an operation only with the extension installed, enabled and Ready "
         "at the version the hub expects; it is being installed, updated, or it failed.",),
        ("See its state with 'outpost extension show NAME --machine M'; fix what failed, "
         "then ask again.",),
        409, None),
    Entry(
        "E9089", "ext_op_failed", "The operation {operation} of extension {name} failed.",
        ("The operation's command exited with an error or its status file said error; the "
         "message carries its own code and text.",),
        ("Read the operation's output ('outpost extension operation ID') and the "
         "extension's log on the machine.",),
        409, None),
    Entry(
        "E9090", "ext_op_hung", "The operation {operation} of extension {name} did not end "
        "within its timeout.",
        ("The command ran past its manifest's timeout_seconds; the agent ended its process "
         "group.",),
        ("Read the extension's log on the machine; raise timeout_seconds in the manifest if "
         "the work needs longer.",),
        409, None),
    Entry(
        "E9091", "ext_op_pressure", "The operation {operation} of extension {name} waited "
        "for the machine's load to pass until its start deadline.",
        ("The operation's manifest says pressure: true, and the machine's CPU or memory "
         "stayed over the agent's thresholds (max_cpu_percent, max_memory_percent) until "
         "the operation had to have started.",),
        ("Ask again when the machine is less busy, or raise the agent's thresholds.",),
        409, "EX-7"),
    Entry(
        "E9092", "ext_op_stale_report", "Extension operation {op_id} is not at attempt "
        "{attempt} on this machine.",
        ("A progress or end report arrived for an attempt that is over (retried, timed "
         "out) or for an operation of another machine.",),
        ("Nothing to do: the report is ignored; the operation's own state is in 'outpost "
         "extension operation ID'.",),
        409, None),
    Entry(
        "E9093", "ext_op_agent_lost", "The agent of machine {machine} stopped heartbeating "
        "while the operation {operation} of extension {name} ran.",
        ("The operation was Running when the machine's agent went silent for longer than its "
         "lease (3 heartbeat intervals, at least 5 s): it was killed, the machine went down "
         "or lost its path to the hub. Whatever the operation was doing is unknown; the "
         "operation ended Failed so that the next one of the extension on the machine can "
         "be handed out.",),
        ("Check the machine ('outpost machine show M') and its agent ('outpost check' there); "
         "read the extension's log on the machine to see how far it got, then ask for the "
         "operation again.",),
        409, "HW-1"),
    Entry(
        "E9094", "ext_failed_here", "Extension {name} failed on this machine at step {step}.",
        ("A step of bringing the extension to its goal failed (the message says which and "
         "why); the agent does not try that version again until the operator asks.",),
        ("Read the extension's log on the machine (<state>/logs/extensions/NAME.log), fix "
         "the cause, then run 'outpost extension retry NAME --machine M'.",),
        409, "EX-5"),
    Entry(
        "E9095", "ext_not_ready_here", "Extension {name} is NotReady on this machine.",
        ("Its enable handler reported a warning, or an update left it enabled without the "
         "version being Ready.",),
        ("Read the message and the extension's log on the machine; fix the cause and set "
         "the extension again (a new seq runs its enable again).",),
        409, None),
    Entry(
        "E9096", "ext_step_overdue", "Extension {name} has been {state} at step {step} for "
        "longer than the step may take.",
        ("The agent is not running (the step goes on from where it was when it starts), or "
         "a handler runs past its timeout_seconds without having been ended, or the "
         "package cannot be fetched.",),
        ("Start the agent if it is stopped ('outpost agent run' or 'systemctl start "
         "outpost-agent'); otherwise read the extension's log on the machine, and remove "
         "the extension ('outpost extension remove', which works in every state) or run "
         "'outpost extension retry NAME --machine M'.",),
        409, "EX-5"),
)

_ENTRIES += (
    # --- the backup store: restic's REST protocol served by the hub (E9060-E9079) --------
    Entry(
        "E9060", "backup_token_invalid",
        "The backup credential is missing or not valid for machine {machine_id}.",
        ("The request carries no token ('Authorization: Bearer TOKEN', or HTTP Basic with "
         "the machine id as user name and the token as password), or a token the hub did "
         "not issue or has since replaced ('backup-token' issues a new one and retires the "
         "old).",
         "The machine was removed from the hub, which deletes its backup credential."),
        ("Issue the machine a backup token (POST /v1/machines/NAME/backup-token) and give "
         "it to restic (RESTIC_REST_PASSWORD, with RESTIC_REST_USERNAME the machine id) or "
         "to the backup bridge (OUTPOST_BACKUP_TOKEN or --token-file).",),
        401, None),
    Entry(
        "E9061", "backup_forbidden",
        "This backup credential is for another machine's repository.",
        ("Each machine's backup token opens that machine's repository only: the request "
         "named another machine (of this account or another).",
         "With HTTP Basic, the user name must be the machine id the path names "
         "(RESTIC_REST_USERNAME).",),
        ("Use the token of the machine whose repository the request names, or restore "
         "through that machine's own credential.",),
        403, None),
    Entry(
        "E9062", "backup_path_invalid", "Not a path of a restic repository: {path}.",
        ("The path names no file type restic uses (config, data, keys, locks, snapshots, "
         "index), or a file name that is not 64 lower-case hexadecimal characters, or "
         "holds '..', a slash or another character no restic file has.",),
        ("Point restic at the repository URL the hub gave (/v1/backup/MACHINE_ID/) and "
         "leave the paths under it to restic.",),
        400, None),
    Entry(
        "E9063", "backup_blob_mismatch",
        "The content of {type}/{name} does not match its name: its SHA-256 is {actual}.",
        ("restic names every file of a repository (but config) by the SHA-256 of its "
         "content; the body was changed or cut short on its way (a proxy, a network "
         "fault), or a client wrote the wrong name.",),
        ("Nothing was stored: run the backup again. If it keeps failing, check what "
         "stands between the machine and the hub.",),
        400, None),
    Entry(
        "E9064", "backup_quota_exceeded",
        "Machine {machine_id}'s backup repository would exceed its quota of {quota} bytes "
        "(it holds {used}).",
        ("The repository's files and this one would take it past the quota set for the "
         "machine (backup-token's quota_bytes, or backup_quota_bytes in "
         "hub.yaml).",),
        ("Forget and prune old snapshots ('restic forget --prune'), or raise the machine's "
         "quota.",),
        413, None),
    Entry(
        "E9065", "backup_file_missing", "The repository has no file {type}/{name}.",
        ("restic asks for files that may not exist (it tests a repository's config "
         "before it creates one); or the file was deleted.",),
        ("Nothing to do when restic goes on; when 'restic check' reports it missing, the "
         "repository lost data: run 'restic check' and 'restic repair' as restic says.",),
        404, None),
    Entry(
        "E9066", "backup_file_exists", "The repository already has {type}/{name}.",
        ("restic never replaces a file of a repository; a file of that name is already "
         "stored with other content (only config and a file whose name is not its hash "
         "can differ).",),
        ("Delete the file first if it really must be replaced; for config, initialise a "
         "new repository instead.",),
        409, None),
    Entry(
        "E9067", "backup_range_invalid",
        "The range {range} cannot be served from {type}/{name} ({size} bytes).",
        ("The Range header is not one 'bytes=START-END' range, or it starts past the end "
         "of the file.",),
        ("Ask for one range inside the file; restic itself always does.",),
        416, None),
    Entry(
        "E9068", "backup_storage_failed",
        "The hub could not store the backup file: {problem}.",
        ("The file system under the hub's data directory is full, read-only or failing.",),
        ("Free space under the hub's data directory (backup/ there holds the "
         "repositories), then run the backup again; nothing half-written was kept.",),
        507, None),
    Entry(
        "E9069", "backup_bridge_failed", "The backup bridge could not start: {problem}.",
        ("outpost-restic-bridge was started without the hub's URL, the machine id, a "
         "readable CA file, or the backup token (OUTPOST_BACKUP_TOKEN or --token-file).",),
        ("Start it as docs/backup.md shows: restic -r rclone:outpost -o "
         "rclone.program=outpost-restic-bridge -o 'rclone.args=--hub URL --machine-id ID "
         "--ca-file CA'.",),
        400, None),
    # --- the backup extension (E9100-E9119) ------------------------------------------------
    Entry(
        "E9100", "ext_credentials_unavailable",
        "The extension needs the machine's {kind} credentials and could not get them.",
        ("The hub could not be reached, refused the machine's signed request, or is older "
         "than the credentials route (POST /v1/agent/credentials/KIND).",),
        ("Check 'outpost agent status' and the agent's log on the machine; the agent asks "
         "again on its own once the hub answers.",),
        503, "EX-12"),
    Entry(
        "E9101", "backup_restic_missing",
        "restic is not installed on this machine, and the backup extension runs it.",
        ("Neither PATH nor /usr/bin/restic has a restic program.",),
        ("Install the package restic (Debian and Ubuntu: 'apt-get install restic'; Fedora: "
         "'dnf install restic'), then 'outpost extension retry backup --machine M'.",),
        400, None),
    Entry(
        "E9102", "backup_restic_failed", "restic failed: {problem}.",
        ("restic could not reach the repository through the hub, the repository password is "
         "wrong, or a path could not be read.",),
        ("Read the message and the extension's log (outpost extension show backup --machine "
         "M); the repository password is the one 'outpost backup enable' printed.",),
        400, None),
    Entry(
        "E9103", "backup_settings_invalid", "The backup settings are not usable: {problem}.",
        ("A setting is missing or of the wrong kind (paths, exclude, pre_snapshot, "
         "repository_password).",),
        ("Set the extension again with 'outpost backup enable --paths ...'.",),
        400, None),
    Entry(
        "E9104", "backup_pre_snapshot_failed",
        "The pre-snapshot step did not finish: {problem}.",
        ("The application's consistency command (pre_snapshot) failed or outlived "
         "pre_snapshot_timeout, and consistency 'application' was required.",),
        ("Make the command finish within pre_snapshot_timeout, raise the timeout, or allow "
         "crash-consistent snapshots (consistency 'crash', the default).",),
        400, "EX-11"),
    # --- the backup catalog and the 'outpost backup' commands (E9110-E9119) ---------------
    Entry(
        "E9110", "backup_snapshot_not_found", "No snapshot '{snapshot}' of machine {machine}.",
        ("The id (or its start) names no snapshot in the hub's catalog of that machine: it is "
         "mistyped, of another machine, or was taken before the catalog knew it.",
         "A start of an id needs at least 4 characters.",),
        ("List the machine's snapshots with 'outpost backup list MACHINE'.",),
        404, None),
    Entry(
        "E9111", "backup_snapshot_ambiguous",
        "The snapshot id prefix '{snapshot}' matches several snapshots of machine {machine}.",
        ("A snapshot may be named by the start of its id, and more than one snapshot of the "
         "machine begins with what was given.",),
        ("Give more characters of the id; 'outpost backup list MACHINE --json' shows the "
         "full ids.",),
        409, None),
    Entry(
        "E9112", "backup_snapshot_forgotten", "Snapshot {snapshot} of machine {machine} was "
        "forgotten.",
        ("A forget operation removed the snapshot from the machine's repository; it can no "
         "longer be restored or forgotten.",),
        ("Pick another snapshot from 'outpost backup list MACHINE'.",),
        409, None),
    Entry(
        "E9113", "backup_wait_timeout", "The {operation} operation {op_id} did not end within "
        "{seconds} s.",
        ("The command stopped following the operation at its --timeout; the operation itself "
         "goes on on the machine (it may be waiting for the machine's load to pass).",),
        ("Follow it with 'outpost extension operation ID', or run the command again with a "
         "longer --timeout.",),
        409, None),
    Entry(
        "E9114", "backup_grant_read_only", "A restore grant opens the repository of machine "
        "{machine_id} read-only.",
        ("The request came with a restore grant (obg_...), which another machine of the "
         "account holds while it restores a snapshot of this one: it may read every file and "
         "take and release restic's locks, and nothing else.",),
        ("Nothing to do on the machine: restic only reads during a restore. Writing to a "
         "machine's repository needs that machine's own backup token.",),
        403, None),
    Entry(
        "E9115", "backup_forget_args", "Say which snapshots to forget: {problem}.",
        ("'outpost backup forget' takes one snapshot id or a keep policy (--keep-last N, "
         "--keep-daily N, ...), not both and not neither.",),
        ("Give SNAPSHOT, or one or more --keep-* options.",),
        400, None),
    Entry(
        "E9116", "backup_grant_refused", "No restore grant for this machine: {problem}.",
        ("A machine asks for a read-only grant to another machine's repository only while it "
         "runs an operation that names that machine as its source: the backup extension's "
         "restore ('outpost backup restore SOURCE --to MACHINE') or the recovery extension's "
         "recover (a point of SOURCE recovered on MACHINE); there is none running, the "
         "source is not a machine of the same account, or the grant of this operation was "
         "already issued.",),
        ("Ask for the restore again with 'outpost backup restore SOURCE SNAPSHOT --to "
         "MACHINE', or the recovery again; it is refused at once when the machines are of "
         "different accounts.",),
        403, None),
    # --- disaster recovery: protections, points, failover (E9120-E9149) -------------------
    Entry(
        "E9120", "recovery_settings_invalid", "The protection's settings are not usable: "
        "{problem}.",
        ("A path is not absolute, no path was given, the interval or the application-"
         "consistent count is out of range, or the retention is not a duration.",),
        ("Run 'outpost protect MACHINE --paths /abs/path ...' again with valid options "
         "('outpost protect --help').",),
        400, None),
    Entry(
        "E9121", "recovery_not_protected", "Machine {machine} is not protected.",
        ("No protection exists for the machine ('outpost protect' was never run for it, or "
         "'outpost unprotect' ended it).",),
        ("Protect it first: 'outpost protect MACHINE --paths ...'; 'outpost protection list' "
         "shows the protected machines.",),
        404, None),
    Entry(
        "E9122", "recovery_not_failed_over", "Machine {machine} is not failed over.",
        ("Failback brings a failed-over machine's data back from the machine it failed over "
         "to; this protection is not in state FailedOver (a test failover does not change "
         "it).",),
        ("See 'outpost protection show MACHINE'; run 'outpost failover MACHINE --to TARGET' "
         "first if a failover is what is wanted.",),
        409, None),
    Entry(
        "E9123", "recovery_failed_over", "Machine {machine} is failed over to {target}.",
        ("The machine's protection is FailedOver: its data is served by the target, no "
         "points are taken of it, and another failover or a change of its protection would "
         "lose track of where the newest data is.",),
        ("Bring it back first with 'outpost failback MACHINE' once the machine is Healthy, "
         "or end the protection with 'outpost unprotect MACHINE'.",),
        409, None),
    Entry(
        "E9124", "recovery_target_invalid", "Machine {target} cannot be the target: "
        "{problem}.",
        ("The target is the protected machine itself, or not a machine of the protection's "
         "target group.",),
        ("Pick a Healthy machine of the target group ('outpost machine list'); 'outpost "
         "protection show MACHINE' names the group.",),
        409, None),
    Entry(
        "E9125", "recovery_action_busy", "A recovery action of machine {machine} is still "
        "running.",
        ("A failover, test failover or failback of the machine has not ended; the actions of "
         "one machine run one at a time.",),
        ("Follow it with 'outpost protection action ID' and ask again once it has ended.",),
        409, None),
    Entry(
        "E9126", "recovery_action_not_found", "No recovery action '{action}' in this "
        "account.",
        ("The id is mistyped, or of another account.",),
        ("List the actions with 'outpost protection actions'.",),
        404, None),
    Entry(
        "E9127", "recovery_behind", "The newest recovery point of machine {machine} is older "
        "than its RPO.",
        ("Points are not being taken or not finishing: the machine's load holds them back, "
         "its agent is silent, the recovery extension is not Ready, or the last point "
         "failed; the protection's health message names the cause.",),
        ("Read 'outpost protection show MACHINE' for the cause: start the agent, let the "
         "load pass (or raise max_cpu_percent), or repair the extension with 'outpost "
         "protect MACHINE --repair'.",),
        409, None),
    Entry(
        "E9128", "recovery_extension_failed", "The recovery extension on machine {machine} "
        "is {state}.",
        ("The recovery extension failed a step on the machine (its install, enable, a hung "
         "handler, a malformed status file) and no point can be taken until it is Ready "
         "again.",),
        ("Reinstall it with 'outpost protect MACHINE --repair' (the points already taken "
         "stay), after fixing what its message names (restic missing: install restic).",),
        409, None),
    Entry(
        "E9129", "recovery_action_failed", "The {kind} of machine {machine} failed at step "
        "{step}: {problem}.",
        ("A step of the action failed: the recover operation on the target (its code is "
         "the operation's), the point on the active machine for a failback, or the "
         "post-failover runbook's job.",),
        ("Read 'outpost protection action ID' (its output and the operation or job it "
         "names), fix the cause, and ask for the action again.",),
        409, None),
    Entry(
        "E9130", "recovery_wait_timeout", "The recovery action {action} did not end within "
        "{seconds} s.",
        ("The command stopped following the action at its --timeout; the action itself goes "
         "on, driven by the hub.",),
        ("Follow it with 'outpost protection action ID'.",),
        409, None),
    # --- edge modules: deployments (E9150-E9164), the agent's modules (E9165-E9179), ------
    # --- messages on the machine (E9180-E9189) and at the hub (E9190-E9199) ---------------
    Entry(
        "E9150", "deployment_invalid", "The deployment manifest is not valid: {problem}.",
        ("A field of the manifest is missing, of the wrong type or out of range, a route "
         "does not parse or names a module the deployment does not have, or the file is "
         "not YAML or JSON (a tab in the indentation, say).",),
        ("Fix the field at the line and column the message names ('outpost deployment "
         "schema' prints the JSON Schema; docs/modules.md describes every field) and "
         "create the deployment again.",),
        422, "ED-2"),
    # --- deployments and module packages on the hub (E9151-E9164) --------------------------
    Entry(
        "E9151", "module_version_exists",
        "Module package {name} {version} is already published with other content.",
        ("A published version is immutable: the package sent has the same name and version "
         "as one the account has, but a different SHA-256.",),
        ("Raise the version in outpost-module.json, build the archive again and publish "
         "that; 'outpost module list' lists what is published.",),
        409, None),
    Entry(
        "E9152", "module_not_found", "No module package '{name}' is published in this "
        "account.",
        ("The name is misspelt, or the package was published in another account (each "
         "account has its own module packages).",),
        ("See 'outpost module list' for the packages of this account, or publish it first "
         "('outpost module publish FILE|DIR').",),
        404, None),
    Entry(
        "E9153", "deployment_package_unknown",
        "The deployment names module package {name} {version}, which is not published in "
        "this account.",
        ("A module's 'package' names a package, or a version of it, that this account has "
         "not published, or its 'sha256' is not the published version's.",),
        ("Publish the package first ('outpost module publish FILE|DIR'), or correct the "
         "name or version in the manifest ('outpost module list' shows what is published); "
         "then create the deployment again.",),
        422, "ED-6"),
    Entry(
        "E9154", "deployment_not_found", "No deployment '{name}' in this account.",
        ("The name is misspelt, the deployment was deleted, or it belongs to another "
         "account.",),
        ("See 'outpost deployment list' for the deployments of this account.",),
        404, None),
    Entry(
        "E9155", "deployment_target_unknown",
        "Cannot aim a deployment at {kind} '{target}': this account has none by that name.",
        ("The group or machine named by --group or --machine does not exist in this "
         "account (a group exists once a machine registers in it or it is created).",),
        ("See 'outpost machine list' and 'outpost group list', and give an existing group "
         "or machine.",),
        404, None),
    Entry(
        "E9156", "module_package_forbidden",
        "This machine's deployment does not name module package {name} {version}.",
        ("The agent asked for a package that the deployment this machine runs does not "
         "name: the name or version in the deployment manifest is wrong, the package is not "
         "published in this account, or the deployment changed since the agent fetched it.",),
        ("Check the package's name and version in the deployment manifest ('outpost "
         "deployment show NAME') and that it is published in this account ('outpost module "
         "list'); the agent fetches the deployment again at its next heartbeat.",),
        403, "ED-6"),
    Entry(
        "E9157", "deployment_rollout_timeout",
        "The deployment {name} did not reach every targeted machine in {seconds} s.",
        ("Some targeted machine has not reported the deployment's version yet, or a module "
         "that should run is not running there (backoff, unhealthy, failed).",),
        ("Run 'outpost deployment rollout NAME' to see each machine's modules and their "
         "reasons; 'outpost machine show M' says why a machine has no deployment.",),
        504, None),
    Entry(
        "E9158", "deployment_none",
        "No deployment targets this machine.",
        ("No deployment of the account names this machine or its group, so its agent runs "
         "no modules.",),
        ("Create one for the machine or its group: 'outpost deployment create NAME FILE "
         "--group G' (or --machine M).",),
        409, "ED-11"),
    Entry(
        "E9159", "deployment_never_fetched",
        "The agent has never fetched its deployment.",
        ("A deployment targets this machine, but its agent has not asked for it: the agent "
         "is not running, is older than edge modules, or cannot resolve or reach the hub "
         "(DNS, a proxy, a firewall).",),
        ("Run 'outpost agent status' and 'outpost check' on the machine: they say whether "
         "the hub resolves and answers.",),
        409, "ED-11"),
    Entry(
        "E9160", "deployment_not_reported",
        "The agent last fetched its deployment {ago} and has not reported its modules since.",
        ("The agent fetched the deployment but has not sent the state of its modules: it is "
         "still fetching packages or starting modules, it stopped, or it cannot reach the "
         "hub now.",),
        ("Wait a heartbeat; if it stays so, look at 'outpost agent status' and 'outpost "
         "agent logs' on the machine.",),
        409, "ED-11"),
    Entry(
        "E9161", "deployment_not_applied",
        "The agent could not apply the deployment: {error}.",
        ("The agent reported that the deployment could not be applied as a whole (the "
         "message says why, with its code).",),
        ("Fix what the reported error names and create the deployment again; 'outpost "
         "deployment rollout NAME' shows every module's reason.",),
        409, "ED-11"),
    Entry(
        "E9165", "module_package_refused", "The package {name} {version} of module {module} "
        "could not be downloaded: the hub returned {status}.",
        ("The deployment names a package version that is not published (404), or the "
         "machine's account may not read it (403): the package belongs to another account, "
         "or the credentials the deployment manifest gives for it are wrong.",),
        ("Check the package name and version in the deployment manifest ('outpost module "
         "list'), and that the package is published to this machine's account; then create "
         "the deployment again.",),
        502, "ED-6"),
    Entry(
        "E9166", "module_port_allocated", "The module {module} cannot start: Bind for "
        "0.0.0.0:{port} failed: port is already allocated.",
        ("Another process on the machine (named in the message where the agent can see it) "
         "listens on a port the module's manifest lists in 'ports'.",),
        ("Stop the process that holds the port, or give the module another port in the "
         "deployment manifest; the agent tries again on its backoff schedule.",),
        409, "ED-5"),
    Entry(
        "E9167", "module_start_failed", "The module {module} could not be started: {problem}.",
        ("The program is missing or not executable, the user it runs as cannot run it, or "
         "its package could not be unpacked.",),
        ("Read the module's log ('outpost agent logs MODULE') and fix the program or the "
         "manifest's command.",),
        409, None),
    Entry(
        "E9168", "module_dns_unprivileged", "The module {module} names DNS servers, which "
        "an agent that does not run as root cannot give it.",
        ("A module's own DNS servers need a mount namespace of its own with its own "
         "resolv.conf, which only a root agent can make.",),
        ("Run the agent as root, or remove 'dns' from the module in the deployment "
         "manifest (it then uses the machine's resolvers).",),
        409, "ED-11"),
    Entry(
        "E9169", "module_restarts_exhausted", "The module {module} ended {count} times in "
        "a row; it is failed until the next deployment or 'outpost agent restart {module}'.",
        ("The module's program keeps exiting (or its probe keeps failing) shortly after it "
         "starts.",),
        ("Read its log ('outpost agent logs {module}'), fix the cause, and run 'outpost "
         "agent restart MODULE' or deploy again.",),
        409, None),
    Entry(
        "E9170", "module_unhealthy", "The module {module} failed its health probe {count} "
        "times in a row: {problem}.",
        ("The module runs but does not answer its probe (command or HTTP on loopback) "
         "within the probe's timeout, or answers with an error.",),
        ("Read its log ('outpost agent logs MODULE') and check the probe in the deployment "
         "manifest.",),
        409, None),
    Entry(
        "E9171", "module_user_unavailable", "The module {module} cannot run as '{user}': "
        "{problem}.",
        ("The manifest's run_as names a user this machine does not have, or the agent "
         "could not make its unprivileged module user.",),
        ("Create the user, or remove run_as from the module so it runs as the agent's "
         "module user (outpost-mod).",),
        409, None),
    Entry(
        "E9172", "module_unknown", "This machine runs no module named '{module}'.",
        ("The name is misspelled, or the deployment that named the module no longer "
         "targets this machine.",),
        ("'outpost agent status' lists the modules the machine runs.",),
        404, None),
    Entry(
        "E9173", "deployment_fetch_failed", "The agent could not fetch its deployment: "
        "{problem}.",
        ("The hub cannot be reached or refused the request; the agent keeps its modules "
         "as the last deployment it applied says and tries again with backoff.",),
        ("Run 'outpost check' for the connectivity findings.",),
        503, "ED-11"),
    Entry(
        "E9180", "msg_socket_unsafe", "The directory {path} for the modules' message socket "
        "is not the agent's own, or others may write it; the agent will not listen there.",
        ("The directory beside the state directory (<state>-messages/) exists and belongs "
         "to another user, is a link, or is writable by others.",),
        ("Remove the directory (or give it to the agent's user, mode 0711) and restart the "
         "agent.",),
        500, None),
    Entry(
        "E9181", "msg_socket_unavailable", "The modules' message socket cannot be made at "
        "{path}: {reason}.",
        ("The socket's path is longer than the system allows (107 bytes), or the directory "
         "cannot be written.",),
        ("Use a shorter state directory path ('state_dir' in the agent's configuration), or "
         "fix the directory's permissions, and restart the agent.",),
        500, None),
    Entry(
        "E9182", "msg_module_not_connected", "The module {module} is not connected to the "
        "agent's message hub.",
        ("The module is not running, has not connected yet (it does so with "
         "outpost.modules.ModuleClient or the wire format of docs/messages.md), or its "
         "connection closed before it answered.",),
        ("Check the module's state and logs ('outpost agent status', 'outpost agent logs "
         "MODULE') and call it again once it runs.",),
        409, None),
    Entry(
        "E9183", "msg_call_timeout", "The module {module} did not answer the call of "
        "{method} within {seconds} s.",
        ("The module has no handler for the method's frames, is busy, or its handler takes "
         "longer than the call's timeout.",),
        ("Give the call a longer timeout_seconds, or make the module's handler answer "
         "sooner (a handler runs on its own thread in the Python client).",),
        504, None),
    Entry(
        "E9190", "upstream_batch_invalid", "The batch of upstream messages is not valid: "
        "{problem}.",
        ("The messages of a batch are not in increasing seq order (a seq twice, or one "
         "lower than the one before it), or a body is not base64.",),
        ("Send the messages in the order the agent took them, each seq once, bodies in "
         "base64 (the agent does; a hand-written client must too).",),
        422, None),
    Entry(
        "E9191", "module_call_timeout", "Module {module} on machine {machine} did not "
        "answer the call of {method} in time.",
        ("The machine's agent is stopped, cannot reach the hub or is not polling, or the "
         "module is not running or did not reply before the call's timeout_seconds.",),
        ("Check the machine with 'outpost machine show MACHINE' and the module with "
         "'outpost agent status' on the machine; call again with a longer --timeout if the "
         "method is slow.",),
        504, None),
    Entry(
        "E9192", "module_call_failed", "The call of {method} on module {module} of machine "
        "{machine} failed: {problem}.",
        ("The agent answered the call with an error that has no code of its own (an agent "
         "that does not know module calls, say).",),
        ("Read the message; update the machine's agent ('outpost agent update') if it does "
         "not know module calls.",),
        502, None),
    Entry(
        "E9193", "message_forwarding_failing", "Forwarding upstream messages to the broker "
        "has been failing since {since}: {problem}.",
        ("The broker (messages.forward in hub.yaml: nats or mqtt) is down, unreachable from the "
         "hub, or refuses the hub's messages; messages are kept and forwarded from the "
         "cursor once it answers again, unless retention prunes them first.",),
        ("Start the broker or correct messages.forward in hub.yaml and restart the hub; "
         "'outpost hub check' and the outpost_messages_forward_* metrics show the lag.",),
        503, None),
)

CATALOG: dict[str, Entry] = {e.code: e for e in _ENTRIES}
BY_NAME: dict[str, Entry] = {e.name: e for e in _ENTRIES}
# Codes retired into another entry (E6003, spread_invalid, is now E7051): an older hub may
# still answer with them.
BY_ALIAS: dict[str, Entry] = {a: e for e in _ENTRIES for a in e.aliases if a.startswith("E")}


def entry(name_or_code: str) -> Entry:
    """The catalog entry for a name (``clock_skew``) or a code (``E1003``)."""
    if name_or_code in BY_NAME:
        return BY_NAME[name_or_code]
    if name_or_code in BY_ALIAS:
        return BY_ALIAS[name_or_code]
    return CATALOG[name_or_code]


def find(text: str) -> list[Entry]:
    """Entries matching a code, a name, or a piece of pasted error text (any case), the
    likeliest first: a code in the text, then the entries whose message (as the catalog or
    the code that raises it words it, values aside) is in the text, the most specific
    first, then those whose message, causes or fixes hold the text."""
    needle = _normal(text)
    if not needle:
        return []
    exact = [e for e in _ENTRIES
             if needle in (e.code.lower(), e.name.lower(), *(a.lower() for a in e.aliases))]
    if exact:
        return exact
    hits: list[Entry] = []
    for token in re.findall(r"\be\d{4}\b", needle):  # "code: E3002" in a pasted block
        hits += [e for e in _ENTRIES if e not in hits and token in (
            e.code.lower(), *(a.lower() for a in e.aliases))]
    best: dict[str, tuple[int, bool]] = {}
    for e, pattern, letters in _matchers():
        if pattern.search(needle):
            score = (letters, pattern.fullmatch(needle) is not None)
            best[e.code] = max(best.get(e.code, score), score)
    hits += [CATALOG[code] for code in sorted(best, key=lambda c: best[c], reverse=True)
             if CATALOG[code] not in hits]
    for e in _ENTRIES:
        hay = _normal(" ".join((e.code, e.name, e.name.replace("_", " "), e.message,
                                *e.causes, *e.fixes)))
        if needle in hay and e not in hits:
            hits.append(e)
    if not hits:  # a long number inside other text: "... failed (151076)"
        for token in re.findall(r"\b\d{5,}\b", needle):
            hits += [e for e in _ENTRIES if e not in hits and (
                token in (a.lower() for a in e.aliases)
                or token in _normal(" ".join((e.message, *e.causes))))]
    if not hits:  # the words in another order or with other punctuation: "unreachable (dns)"
        words = set(re.findall(r"[a-z0-9]+", needle))
        if len(words) >= 2:
            hits = [e for e in _ENTRIES if words <= set(re.findall(r"[a-z0-9]+", _normal(
                " ".join((e.name.replace("_", " "), e.message, *e.causes, *e.fixes)))))]
    return hits


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "`": "'"})
# A template with fewer letters than this outside its values ("{}:{}:{}: {}", a file name,
# line and column before a problem) would match nearly any text: it is left out.
MATCH_MIN_LETTERS = 8


def _normal(text: str) -> str:
    """Lower case, one space between words, plain quotes: how a pasted text is compared."""
    return " ".join(text.translate(_QUOTES).lower().split())


def _pieces(template: str) -> list[str]:
    """The literal text of a message template around its values: ``{name}`` in the
    catalog, ``{}`` in messages.py, where ``{{`` and ``}}`` are literal braces."""
    pieces, current = [], ""
    for token in re.split(r"(\{\{|\}\}|\{[a-z_]*\})", template):
        if token in ("{{", "}}"):
            current += token[0]
        elif re.fullmatch(r"\{[a-z_]*\}", token):
            pieces.append(current)
            current = ""
        else:
            current += token
    return [*pieces, current]


def pattern(template: str) -> tuple[re.Pattern[str], int]:
    """A template as a regular expression over normalised text (a value may be anything,
    a trailing period is optional), and how many letters it has outside its values."""
    pieces = _pieces(template)
    pieces[-1] = pieces[-1].rstrip().rstrip(".")
    letters = sum(c.isalpha() for piece in pieces for c in piece)
    return re.compile(".*?".join(re.escape(_normal(p)) for p in pieces)), letters


@cache
def _matchers() -> list[tuple[Entry, re.Pattern[str], int]]:
    from .messages import TEMPLATES

    found = []
    for e, template in [*((e, e.message) for e in _ENTRIES),
                        *((BY_NAME[n], t) for n, t in TEMPLATES if n in BY_NAME)]:
        regex, letters = pattern(template)
        if letters >= MATCH_MIN_LETTERS:
            found.append((e, regex, letters))
    return found


class OutpostError(Exception):
    """An expected failure with a stable catalog code."""

    def __init__(
        self, key: str, message: str | None = None, /, *, fix: str | None = None,
        **details: Any,
    ) -> None:
        self.entry = entry(key)
        self.message = message or self.entry.message
        self.fix = fix or self.entry.fixes[0]
        self.details: dict[str, Any] = details
        super().__init__(self.message)

    @property
    def code(self) -> str:
        return self.entry.code

    @property
    def reason(self) -> str:
        return self.entry.name

    def to_body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "fix": self.fix,
            "details": self.details,
        }


def _cause(exc: OutpostError) -> str:
    """The entry's cause for this error: where causes are by kind ("tls: ..."), the one of
    the error's ``kind``; else the first."""
    kind = exc.details.get("kind")
    if isinstance(kind, str) and kind:
        for cause in exc.entry.causes:
            if cause.startswith(f"{kind}: "):
                return cause
        if all(re.match(r"\w+: ", cause) for cause in exc.entry.causes):
            return (f"{kind}: none of the usual causes; the message says what failed "
                    f"('outpost explain {exc.entry.code}' lists them).")
    return exc.entry.causes[0]


def describe(exc: OutpostError) -> list[str]:
    """The lines a command prints for an error: message, code, cause, fix, details."""
    lines = [f"error: {exc.message}", f"  code:   {exc.code} ({exc.reason})"]
    if exc.entry.causes:
        lines.append(f"  cause:  {_cause(exc)}")
    lines.append(f"  fix:    {exc.fix}")
    shown = {k: v for k, v in exc.details.items()
             if v not in (None, "", [], {}) and k != "problems"}
    if shown:
        lines.append("  details: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    for problem in exc.details.get("problems", [])[:10]:
        where = (f" (line {problem['line']}, column {problem.get('column')})"
                 if isinstance(problem, dict) and problem.get("line") else "")
        lines.append(f"  - {problem.get('field')}{where}: {problem.get('problem')}")
    lines.append(f"  more:   outpost explain {exc.code}")
    return lines


class HubRefused(OutpostError):
    """The hub answered with an error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        code = str(body.get("code", "E3006"))
        known = CATALOG.get(code) or BY_ALIAS.get(code)
        name = known.name if known else "internal_error"
        details = body.get("details")
        # A body from a proxy or an older hub may carry anything here.
        details = ({k: v for k, v in details.items() if k != "fix"}
                   if isinstance(details, dict) else {})
        super().__init__(name, str(body.get("message") or ""), fix=body.get("fix"), **details)
        self.status = status
        self.body = body


_TRANSPORT_FIXES = {
    "tls": "Check that the URL names the hub you mean and that its certificate chains to the "
           "CA you trust (its --ca-fingerprint, or --data-dir of that hub) and has not "
           "expired; 'outpost check' on an agent's machine tells which.",
    "refused": "Check that the hub runs and listens at that address and port ('outpost hub "
               "check' on the hub's machine), and that the URL's port is the one it binds.",
}


class TransportError(OutpostError):
    """The hub could not be reached; ``kind`` is dns, refused, timeout, tls, proxy or other."""

    def __init__(self, kind: str, url: str, detail: str) -> None:
        super().__init__(
            "hub_unreachable",
            f"The hub could not be reached at {url} ({kind}): {detail}",
            fix=_TRANSPORT_FIXES.get(kind), kind=kind, url=url,
        )
        self.kind = kind
