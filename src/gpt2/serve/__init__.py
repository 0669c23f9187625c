"""``gpt2 serve``: OpenAI's completions API for any model directory, with continuous batching,
streaming and a playground page. :mod:`.engine` batches, :mod:`.api` checks requests,
:mod:`.app` is the HTTP server."""
