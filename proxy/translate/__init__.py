"""Pure translation, no I/O: V2 body -> Plan; V3 task result -> V2 progress; V3 error -> V2 code."""
