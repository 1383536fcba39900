// roomcast client library: see docs/CLIENT.md
