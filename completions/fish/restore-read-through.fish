function __restore-read-through_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __restore-read-through_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __restore-read-through_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __restore-read-through_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __restore-read-through_parse_tokens -S
    set -l unparsed_tokens (__restore-read-through_tokens -pc)
    switch $unparsed_tokens[1]
    case 'restore-read-through'
        __restore-read-through_parse_subcommand 1 'backup=+' 'map=' 'read-only-backup=' 'reuse=+' 'backup-signature=' 'socket=' 'listen=' 'block-size=' 'tls=' 'tls-certificates=' 'tls-verify-peer' 'max-connections=' 'handshake-timeout=' 'idle-timeout=' 'stall-timeout=' 'ack=' 'journal=' 'max-lag=+' 'hydrate' 'hydrate-rate=' 'backup-timeout=' 'backup-connections=' 'progress-interval=' 'h/help'
        switch $unparsed_tokens[1]
        case 'help'
            __restore-read-through_parse_subcommand -r 1 
        end
    end
end

function __restore-read-through_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __restore-read-through_parse_subcommand -S -a positional_count
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

function __restore-read-through_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __restore-read-through_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__restore-read-through_tokens -p)
    if test -z "$(__restore-read-through_tokens -t)"
        set -l index (count (__restore-read-through_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'restore-read-through' -f
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through"' -l 'backup' -d 'The backup: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds, nbds+unix: over TLS); repeat it for more far copies, which get every write too (the first is read from).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" map' -l 'map' -d 'The overwrite map of PRIMARY (created when missing).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" read-only-backup' -l 'read-only-backup' -d 'The backup takes no writes: keep them on PRIMARY and record the blocks they touch in this change map (created when missing, continued when present), for snapshot --map CHANGES --base ID.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through"' -l 'reuse' -d 'An older copy of the disk at this site (image file, block device or NBD export, read only): a block it holds, checked against the digest --backup-signature gives, is copied from it instead of fetched (repeatable).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" backup-signature' -l 'backup-signature' -d 'The backup\'s signature (bitmap-diff --signature), a file or - for standard input: the digests a block from --reuse must have. It must describe the backup as it is read during the restore.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" socket' -l 'socket' -d 'Serve on this Unix socket.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" listen' -l 'listen' -d 'Serve on TCP HOST:PORT (HOST defaults to 127.0.0.1).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" tls' -l 'tls' -d 'Offer NBD over TLS to clients that ask (on), demand it (require), or not (off).' -rfka 'off on require'
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" tls-certificates' -l 'tls-certificates' -d 'Directory with ca-cert.pem, server-cert.pem and server-key.pem (the key mode 0600 or 0640).' -rfa '(__restore-read-through_complete_directories)'
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" tls-verify-peer' -l 'tls-verify-peer' -d 'Accept only clients with a certificate signed by the directory\'s ca-cert.pem.'
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" max-connections' -l 'max-connections' -d 'Clients served at once; more are disconnected as they arrive.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" handshake-timeout' -l 'handshake-timeout' -d 'Seconds a client has to finish the NBD handshake (TLS included; 0: no limit).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" idle-timeout' -l 'idle-timeout' -d 'Disconnect a client silent this many seconds between requests (0: never, as a mounted disk may idle).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" stall-timeout' -l 'stall-timeout' -d 'Disconnect a client that pauses this many seconds inside a request or in taking a reply (0: never).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" ack' -l 'ack' -d 'When a write is acknowledged: all (once the far copies hold it), local (once the primary and the journal do; the far copies are brought up to date in the background), or quorum=K (as local, and a flush waits until K far copies hold it).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" journal' -l 'journal' -d 'The mirror journal of --ack local or quorum (default: MAP.mirror beside the map).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through"' -l 'max-lag' -d 'Writes wait while the far copies owe this much: bytes of journal (K, M, G; default 1G) or seconds since the oldest change they lack (30s); repeat for both.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" hydrate' -l 'hydrate' -d 'Copy the blocks not yet current from the backup in the background.'
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" hydrate-rate' -l 'hydrate-rate' -d 'Limit the background copy to this many bytes a second, in any few seconds but for a burst of one second\'s worth, or of one 1 MiB run if more (K, M, G: powers of 1024).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" backup-timeout' -l 'backup-timeout' -d 'Seconds a request to the backup may take before it fails with EIO.' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" backup-connections' -l 'backup-connections' -d 'Connections to the backup, used together (1 to 16).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" progress-interval' -l 'progress-interval' -d 'Seconds between progress lines in the log (0: none).' -rfka ''
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_flags_or_options "restore-read-through" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'restore-read-through' -n '__restore-read-through_should_offer_completions_for_positional "restore-read-through" -eq 1' -fa 'help' -d 'Show subcommand help information.'
