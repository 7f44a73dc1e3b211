/*
 * Chat templates: how a conversation becomes the text a chat model was trained on. Four named
 * templates, each reproducing its reference rendering exactly:
 *   chatml  ChatML: <|im_start|>role\n...<|im_end|>\n for each message, no system prompt added
 *   smollm2 SmolLM2's (the jinja chat_template stored in its GGUF): ChatML, with SmolLM2's default
 *           system prompt when the conversation has none
 *   llama3  Llama 3's: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
 *   plain   Anthropic HH style: "\n\nHuman: ...\n\nAssistant: ..."
 * and the stop strings that end an assistant turn in each.
 */
#ifndef LLMC_CHAT_TEMPLATE_H
#define LLMC_CHAT_TEMPLATE_H

typedef struct {
    const char *role;      // "system", "user" or "assistant"
    const char *content;
} ChatMessage;

typedef struct ChatTemplate ChatTemplate;

// The template called `name`, or NULL.
const ChatTemplate *chat_template_find(const char *name);
// The template called `name`; an unknown name is a fatal error listing the valid names.
const ChatTemplate *chat_template_lookup(const char *name);
// Comma-separated list of the template names (for --help and error messages).
const char *chat_template_names(void);
const char *chat_template_name(const ChatTemplate *t);
// The template whose markers appear in a model's own jinja template (GGUF
// tokenizer.chat_template), or NULL when none is recognised.
const ChatTemplate *chat_template_guess(const char *jinja_source);

// Renders the messages (roles system/user/assistant, in order) as a malloc'd string; with
// add_generation_prompt the header that opens the assistant's reply is appended.
char *chat_template_render_messages(const ChatTemplate *t, const ChatMessage *messages, int n_messages,
                                    int add_generation_prompt);
// The common case: an optional system prompt (NULL for none) and one user message.
char *chat_template_render(const ChatTemplate *t, const char *system, const char *user,
                           int add_generation_prompt);

// Strings that end the assistant's turn (generation stops at the first one produced); the
// array is NULL-terminated. For chatml and llama3 each is also a single special token.
const char *const *chat_template_stop_strings(const ChatTemplate *t);
#endif
