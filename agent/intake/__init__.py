"""From the broker to the windows: the MQTT session, decoding, event time, the ack ledger."""
