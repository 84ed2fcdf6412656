function __tracking-server_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __tracking-server_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __tracking-server_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __tracking-server_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __tracking-server_parse_tokens -S
    set -l unparsed_tokens (__tracking-server_tokens -pc)
    switch $unparsed_tokens[1]
    case 'tracking-server'
        __tracking-server_parse_subcommand 0 'h/help'
        switch $unparsed_tokens[1]
        case 'serve'
            __tracking-server_parse_subcommand 1 'changes=' 'socket=' 'listen=' 'control=' 'store=' 'store-limit=' 'block-size=' 'tls=' 'tls-certificates=' 'tls-verify-peer' 'max-connections=' 'handshake-timeout=' 'idle-timeout=' 'stall-timeout=' 'backup=+' 'backup-connections=' 'backup-timeout=' 'ack=' 'journal=' 'max-lag=+' 'history=' 'keep-time=' 'keep-bytes=' 'h/help'
        case 'freeze'
            __tracking-server_parse_subcommand 0 'socket=' 'control=' 'changes-out=' 'json' 'h/help'
        case 'drop'
            __tracking-server_parse_subcommand 0 'socket=' 'control=' 'view=' 'json' 'h/help'
        case 'new-generation'
            __tracking-server_parse_subcommand 0 'socket=' 'control=' 'changes-out=' 'json' 'h/help'
        case 'group'
            __tracking-server_parse_subcommand 1 'control=+' 'socket=+' 'changes-out=+' 'before=' 'after=' 'max-hold=' 'json' 'h/help'
        case 'status'
            __tracking-server_parse_subcommand 0 'socket=' 'control=' 'json' 'h/help'
        case 'points'
            __tracking-server_parse_subcommand 0 'socket=' 'control=' 'at=' 'json' 'h/help'
        case 'help'
            __tracking-server_parse_subcommand -r 1 
        end
    end
end

function __tracking-server_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __tracking-server_parse_subcommand -S -a positional_count
    argparse -s r -- $argv
    set -l option_specs $argv[2..]
    set -l is_repeating_positional $_flag_r
    set -el _flag_r
    set -a commands $unparsed_tokens[1]
    set positional_index 0
    while true
        set -e unparsed_tokens[1]
        argparse -sn "$commands" $option_specs -- $unparsed_tokens 2> /dev/null
        set unparsed_tokens $argv
        set positional_index (math $positional_index + 1)
        for non_repeating_flag_or_option in $non_repeating_flags_or_options
            if set -ql "_flag_$(string replace -a - _ -- $non_repeating_flag_or_option)"
                set non_repeating_flags_or_options_absent 1
                break
            end
        end
        test (count $unparsed_tokens) -eq 0 -o \( -z "$is_repeating_positional" -a "$positional_index" -gt "$positional_count" \) && break
    end
end

function __tracking-server_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __tracking-server_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__tracking-server_tokens -p)
    if test -z "$(__tracking-server_tokens -t)"
        set -l index (count (__tracking-server_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'tracking-server' -f
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'serve' -d 'Export DEVICE over NBD, tracking its writes in a change map.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'freeze' -d 'Freeze a point-in-time view of the running server\'s device.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'drop' -d 'Drop the frozen view; its export and preservation store go.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'new-generation' -d 'End the current generation, saving its change map, and start a new one.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'group' -d 'Freeze, or end the generations of, several servers\' devices at one instant: a consistency group.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'status' -d 'Report the generation, the changed blocks and the frozen view of a running server.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'points' -d 'List the points in time a running server keeps (--history).'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_positional "tracking-server" -eq 1' -fa 'help' -d 'Show subcommand help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" changes' -l 'changes' -d 'The change map (created when missing).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" socket' -l 'socket' -d 'Serve on this Unix socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" listen' -l 'listen' -d 'Serve on TCP HOST:PORT (HOST defaults to 127.0.0.1).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" control' -l 'control' -d 'The control socket (default: the --socket path with .control added).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" store' -l 'store' -d 'The preservation store of a frozen view (default: MAP.store).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" store-limit' -l 'store-limit' -d 'Most bytes a view may preserve (default: the device size or half the free space of the store\'s file system, whichever is smaller).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" tls' -l 'tls' -d 'Offer NBD over TLS to clients that ask (on), demand it (require), or not (off).' -rfka 'off on require'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" tls-certificates' -l 'tls-certificates' -d 'Directory with ca-cert.pem, server-cert.pem and server-key.pem (the key mode 0600 or 0640).' -rfa '(__tracking-server_complete_directories)'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" tls-verify-peer' -l 'tls-verify-peer' -d 'Accept only clients with a certificate signed by the directory\'s ca-cert.pem.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" max-connections' -l 'max-connections' -d 'Clients served at once; more are disconnected as they arrive.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" handshake-timeout' -l 'handshake-timeout' -d 'Seconds a client has to finish the NBD handshake (TLS included; 0: no limit).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" idle-timeout' -l 'idle-timeout' -d 'Disconnect a client silent this many seconds between requests (0: never, as a mounted disk may idle).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" stall-timeout' -l 'stall-timeout' -d 'Disconnect a client that pauses this many seconds inside a request or in taking a reply (0: never).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve"' -l 'backup' -d 'A far copy to keep of the device, asynchronously (with --ack local or quorum=K): nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds, nbds+unix: over TLS); repeatable.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" backup-connections' -l 'backup-connections' -d 'Connections to each far copy, used together (1 to 16).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" backup-timeout' -l 'backup-timeout' -d 'Seconds a request to a far copy may take before it is tried again.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" ack' -l 'ack' -d 'When a write is acknowledged: all (once the far copies hold it), local (once the primary and the journal do; the far copies are brought up to date in the background), or quorum=K (as local, and a flush waits until K far copies hold it).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" journal' -l 'journal' -d 'The mirror journal of --ack local or quorum (default: MAP.mirror beside the map).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve"' -l 'max-lag' -d 'Writes wait while the far copies owe this much: bytes of journal (K, M, G; default 1G) or seconds since the oldest change they lack (30s); repeat for both.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" history' -l 'history' -d 'Keep points in time of the device in this directory (created when missing; an existing history is continued).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" keep-time' -l 'keep-time' -d 'Trim the points older than this (90s, 30m, 24h, 7d, 2w; with --history).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" keep-bytes' -l 'keep-bytes' -d 'Trim the oldest points while the history\'s records take more than this (K, M, G; with --history).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server serve" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server freeze" socket' -l 'socket' -d 'The server\'s NBD socket (its control socket is PATH.control).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server freeze" control' -l 'control' -d 'The server\'s control socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server freeze" changes-out' -l 'changes-out' -d 'End the generation at the freeze and save its change map here.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server freeze" json' -l 'json' -d 'Print the result as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server freeze" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server drop" socket' -l 'socket' -d 'The server\'s NBD socket (its control socket is PATH.control).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server drop" control' -l 'control' -d 'The server\'s control socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server drop" view' -l 'view' -d 'Drop the view only if it is this one (its id, as freeze and status print it); another view held is kept, and the drop refused.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server drop" json' -l 'json' -d 'Print the result as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server drop" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server new-generation" socket' -l 'socket' -d 'The server\'s NBD socket (its control socket is PATH.control).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server new-generation" control' -l 'control' -d 'The server\'s control socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server new-generation" changes-out' -l 'changes-out' -d 'Save the ending generation\'s change map here.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server new-generation" json' -l 'json' -d 'Print the result as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server new-generation" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group"' -l 'control' -d 'A device\'s control socket; repeatable, one per device.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group"' -l 'socket' -d 'A device\'s NBD socket (its control socket is PATH.control); repeatable, after the --control devices.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group"' -l 'changes-out' -d 'Save a device\'s ending generation\'s change map here; once per device, in device order (new-generation: required).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group" before' -l 'before' -d 'Run this (with /bin/sh -c) before holding writes; a non-zero exit ends the command with nothing held.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group" after' -l 'after' -d 'Run this (with /bin/sh -c) after the release, whenever --before succeeded.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group" max-hold' -l 'max-hold' -d 'Seconds each server may hold writes before it releases them by itself (above 0, at most 60).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group" json' -l 'json' -d 'Print the result as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server group" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server status" socket' -l 'socket' -d 'The server\'s NBD socket (its control socket is PATH.control).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server status" control' -l 'control' -d 'The server\'s control socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server status" json' -l 'json' -d 'Print the status as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server status" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server points" socket' -l 'socket' -d 'The server\'s NBD socket (its control socket is PATH.control).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server points" control' -l 'control' -d 'The server\'s control socket.' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server points" at' -l 'at' -d 'Only the newest point at or before this instant (RFC 3339, UTC).' -rfka ''
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server points" json' -l 'json' -d 'Print the points as one JSON object on standard output.'
complete -c 'tracking-server' -n '__tracking-server_should_offer_completions_for_flags_or_options "tracking-server points" h help' -s 'h' -l 'help' -d 'Show help information.'
