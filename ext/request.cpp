#include "request.h"

#include <fcntl.h>
#include <unistd.h>

#include <stdexcept>

#include "sampling.h"

namespace llama_crab {

Request::Request(uint64_t id_, std::vector<llama_token> prompt_, SamplingParams params_, common_sampler * sampler_)
    : id(id_), prompt(std::move(prompt_)), params(std::move(params_)), sampler(sampler_) {
    // A non-blocking self-pipe lets an event loop (asyncio add_reader) wait for events
    // without a thread per stream.
    int fds[2];
    if (pipe(fds) != 0) {
        common_sampler_free(sampler);
        throw std::runtime_error("cannot create the request's event pipe");
    }
    for (int fd : fds) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    pipe_r_ = fds[0];
    pipe_w_ = fds[1];
}

Request::~Request() {
    common_sampler_free(sampler);
    if (pipe_r_ >= 0) close(pipe_r_);
    if (pipe_w_ >= 0) close(pipe_w_);
}

size_t event_bytes(const Event & ev) {
    size_t n = 64 + ev.text.size() + 4 * ev.token_ids.size() + ev.error.size();
    if (ev.logprobs) {
        for (const auto & lp : *ev.logprobs) {
            n += 16 + lp.text.size();
            for (const auto & t : lp.top) n += 16 + t.text.size();
        }
    }
    for (const auto & d : ev.chat_deltas) {
        n += 32 + d.content.size() + d.reasoning_content.size() + d.tool_id.size() + d.tool_name.size() +
             d.tool_arguments.size();
    }
    return n;
}

void Request::push(Event ev) {
    std::lock_guard<std::mutex> lock(mu_);
    if (final_pushed_) return;
    final_pushed_ = ev.is_final;
    buffered_bytes_.fetch_add(event_bytes(ev), std::memory_order_relaxed);
    events_.push_back(std::move(ev));
    if (!signaled_) {
        const char b = 1;
        // The pipe is non-blocking and holds at most one byte, so this cannot block.
        signaled_ = write(pipe_w_, &b, 1) == 1;
    }
    cv_.notify_all();
}

void Request::drain_pipe_locked() {
    if (!signaled_) return;
    char buf[8];
    while (read(pipe_r_, buf, sizeof buf) > 0) {
    }
    signaled_ = false;
}

namespace {

// Append a later chunk to an earlier one: one message for a consumer that fell behind
// instead of one per step it missed. Text, tokens and logprobs concatenate; a chat
// delta continues the previous one when it adds to the same text or tool call.
void append_chunk(Event & into, Event && later) {
    into.text += later.text;
    into.token_ids.insert(into.token_ids.end(), later.token_ids.begin(), later.token_ids.end());
    into.n_tokens = later.n_tokens;
    if (into.logprobs && later.logprobs) {
        into.logprobs->insert(into.logprobs->end(), std::make_move_iterator(later.logprobs->begin()),
                              std::make_move_iterator(later.logprobs->end()));
    }
    for (auto & d : later.chat_deltas) {
        ChatDelta * last = into.chat_deltas.empty() ? nullptr : &into.chat_deltas.back();
        const bool same_text = last && last->tool_index < 0 && d.tool_index < 0;
        const bool same_call = last && d.tool_index >= 0 && last->tool_index == d.tool_index && d.tool_id.empty() &&
                               d.tool_name.empty();
        if (same_text) {
            last->content += d.content;
            last->reasoning_content += d.reasoning_content;
        } else if (same_call) {
            last->tool_arguments += d.tool_arguments;
        } else {
            into.chat_deltas.push_back(std::move(d));
        }
    }
}

}  // namespace

std::vector<Event> Request::take_locked() {
    std::vector<Event> out;
    out.reserve(events_.size());
    for (auto & ev : events_) {
        if (!ev.is_final && !out.empty() && !out.back().is_final) {
            append_chunk(out.back(), std::move(ev));
        } else {
            out.push_back(std::move(ev));
        }
    }
    events_.clear();
    buffered_bytes_.store(0, std::memory_order_relaxed);
    drain_pipe_locked();
    return out;
}

std::vector<Event> Request::poll() {
    std::lock_guard<std::mutex> lock(mu_);
    return take_locked();
}

std::vector<Event> Request::wait(double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    // Once the final event was taken nothing more comes: never block then.
    auto ready = [&] { return !events_.empty() || final_pushed_; };
    if (timeout_s < 0) {
        cv_.wait(lock, ready);
    } else {
        cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
    }
    return take_locked();
}

bool Request::finished() const {
    std::lock_guard<std::mutex> lock(mu_);
    return final_pushed_ && events_.empty();
}

}  // namespace llama_crab
