-- Whether the proxy forwards the agent's W3C trace context (traceparent,
-- tracestate) to this vendor. Off unless the operator turns it on: a
-- vendor is not told of keycap's traces by default.
ALTER TABLE vendors ADD COLUMN forward_trace_context BOOLEAN NOT NULL DEFAULT FALSE;
